"""Today's Mem0 (2.2.1) as a client. Each add() makes one ADD-only extraction call: a 33,653-character system
prompt and the changing sections, 8,652 tokens, over the 8,192-token context of the bundled teacher and of its
student. `capture` classifies it (configs/mem0.yaml's third rule); the bundled teacher refuses it; the expert,
trained on what changes in the captured calls (the client template), reads a few hundred tokens of it and answers
in the JSON shape Mem0 2.x parses, so Mem0 stores what the expert returned.

No teacher that can read a Mem0 2.x call runs here: for the captured calls a stub OpenAI server stands in for
one (one valid Mem0 2.x answer to every call), so nothing about the expert's quality is asserted; Mem0 2.2.1,
capture, the template, distill, serve-experts and the bundled teacher's refusal are the real ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import httpx
import pytest
import yaml

from memlora.processes import stop_group
from memlora.serve import wait_healthy
from tests.conftest import BIN, REPO, free_port
from tests.stub_openai import StubOpenAI

MEM0_V2 = REPO / ".mem0-v2"
ANSWER = {"memory": [{"id": "0", "text": "Nadia went to her sister Mira's wedding in Lisbon", "attributed_to": "user"}]}


def mem0_v2(url: str, model: str, folder, conversation: int, adds: int) -> dict:
    """Mem0 2.x's add()s against `url`, in its own process (it cannot share this one's Mem0 1.0.11)."""
    env = dict(os.environ, PYTHONPATH=str(MEM0_V2), MEM0_TELEMETRY="False")
    done = subprocess.run([str(BIN / "python"), str(REPO / "tests" / "mem0_v2_driver.py"), url, model, str(folder),
                           str(conversation), str(adds)], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"] == "2.2.1", result
    return result


def config_for(tmp_path):
    """configs/mem0.yaml with the Mem0 2.x rule only, templates from this test's few calls, a one-step distill."""
    raw = yaml.safe_load((REPO / "configs" / "mem0.yaml").read_text())
    raw["capture"]["rules"] = [r for r in raw["capture"]["rules"] if r.get("system_contains") ==
                               "You are a Memory Extractor"]
    assert len(raw["capture"]["rules"]) == 1
    raw["capture"].update(validation_ratio=0.0, template_min_calls=3)
    # One short memory per answer, so that a barely trained expert's answer is complete within Mem0's 300 tokens:
    # what Mem0 then stores is the expert's answer (its quality is not the point here)
    memory = raw["capture"]["rules"][0]["schema"]["properties"]["memory"]
    memory.update(minItems=1, maxItems=1)
    memory["items"]["properties"]["text"]["maxLength"] = 60
    raw["distill"].update(max_steps=1, max_epochs=1, batch_size=1)
    raw["student"]["prune"] = {"from": "teacher", "every": 3}  # a 10-layer student keeps the test short
    path = tmp_path / "mem0-v2.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def start(args, log_path):
    with open(log_path, "wb") as log:
        return subprocess.Popen([str(BIN / "memlora"), *args], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=REPO)


def up(proc, port, log_path) -> str:
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, 240)
    except (RuntimeError, TimeoutError) as err:
        raise RuntimeError(f"{err}: {log_path.read_text()[-3000:]}") from None
    return url


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.timeout(900)
def test_mem0_v2_call_is_captured_cut_to_what_changes_and_served(tmp_path, prefect_server):
    if not (MEM0_V2 / "mem0").is_dir():
        pytest.fail(f"{MEM0_V2}: Mem0 2.x is not installed apart (run `make setup`)")
    config, out = config_for(tmp_path), tmp_path / "out"
    procs = []
    try:
        # The bundled teacher cannot read the call: capture classifies it, passes on the teacher's 400, records
        # nothing, and Mem0 stores nothing (its LLMError)
        teacher_port, capture_port = free_port(), free_port()
        procs.append(start(["serve-model", "--config", str(config), "--name", "teacher", "--port", str(teacher_port)],
                           tmp_path / "teacher.log"))
        up(procs[-1], teacher_port, tmp_path / "teacher.log")
        procs.append(start(["capture", "--config", str(config), "--out", str(tmp_path / "refused"), "--port",
                            str(capture_port), "--upstream", f"http://127.0.0.1:{teacher_port}/v1"],
                           tmp_path / "capture-refused.log"))
        url = up(procs[-1], capture_port, tmp_path / "capture-refused.log")
        refused = mem0_v2(f"{url}/v1", "teacher", tmp_path / "m0-refused", 0, 1)
        counts = httpx.get(f"{url}/health").json()["counts"]
        assert refused["stored"] == [] and "context" in " ".join(refused["errors"]), refused
        assert counts["upstream_errors_extraction"] == 1 and "unmatched" not in counts, counts
        for proc in procs:
            stop_group(proc)
        procs.clear()

        # A teacher that can read it (the stub): three add()s captured -> the template -> an expert
        with StubOpenAI() as stub:
            stub.reply = json.dumps(ANSWER)
            capture_port = free_port()
            procs.append(start(["capture", "--config", str(config), "--out", str(out), "--port", str(capture_port),
                                "--upstream", stub.url], tmp_path / "capture.log"))
            url = up(procs[-1], capture_port, tmp_path / "capture.log")
            mem0_v2(f"{url}/v1", "teacher", tmp_path / "m0-capture", 0, 3)
            counts = httpx.get(f"{url}/health").json()["counts"]
            stop_group(procs.pop())
        assert counts["recorded_extraction"] == 3, counts
        env = dict(os.environ, PREFECT_API_URL=prefect_server["url"], PREFECT_HOME=str(prefect_server["home"]))
        distill = subprocess.run([str(BIN / "memlora"), "distill", "--config", str(config), "--out", str(out)],
                                 env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert distill.returncode == 0, distill.stdout[-3000:] + distill.stderr[-3000:]
        shown = subprocess.run([str(BIN / "memlora"), "templates", "--config", str(config), "--out", str(out)],
                               env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        whole, read = (int(x) for x in re.search(r"tokens per call: (\d+) as the client sends it, (\d+) read",
                                                  shown.stdout).groups())
        assert whole > 8192 - 300 and read < 0.2 * whole, shown.stdout  # over the context whole; not once cut
        assert "## New Messages" in shown.stdout, shown.stdout

        # Served: Mem0 2.x's add() through serve-experts stores what the expert answered
        experts_port = free_port()
        procs.append(start(["serve-experts", "--config", str(config), "--out", str(out), "--port", str(experts_port)],
                           tmp_path / "experts.log"))
        url = up(procs[-1], experts_port, tmp_path / "experts.log")
        served = mem0_v2(f"{url}/v1", "memlora", tmp_path / "m0-served", 1, 1)
        health = httpx.get(f"{url}/health").json()
        assert served["errors"] == [] and served["stored"], (served, health["counts"])
        assert health["counts"]["extraction_reduced"] == 1, health["counts"]
        assert "extraction_template_mismatch" not in health["counts"], health["counts"]
    finally:
        for proc in procs:
            stop_group(proc)
