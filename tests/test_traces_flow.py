"""The generate-traces flow on a real Prefect server: the real bundled teacher on one conversation, and
resume after a SIGKILL on a tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pyarrow.parquet as pq
import pytest
import yaml

from memlora.config import OPERATIONS
from memlora.processes import stop_group
from tests.conftest import REPO, TEACHER_REF

VOLATILE = {"latency_s", "batch_size"}  # wall time, and how calls happened to share batches


def write_config(path: Path, teacher: str, **data) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())
    raw["teacher"].update(model=teacher, device="cpu", batch_size=8, logprobs_top_k=4)
    raw["data"].update(data)
    raw["data"]["split"] = {"test_ratio": 0.25, "validation_ratio": 0.0, "seed": 0}  # 3 train, 1 test
    # min_similarity 0: every fact gets an update call (Mem0's way), so one short session still traces all
    # three operations; the embedded default's floor adds its first facts without one.
    raw["memory"].update(window=4, max_facts=2, max_fact_chars=40, answer_max_chars=24, min_similarity=0.0)
    raw["memory"]["operations"] = {"extraction": {"max_new_tokens": 64}, "update": {"max_new_tokens": 64},
                                   "generation": {"max_new_tokens": 16}}
    raw["prefect"] = {"concurrency": 1}
    path.write_text(yaml.safe_dump(raw))
    return path


def rows(out: Path) -> dict[str, list[dict]]:
    result = {}
    for op in OPERATIONS:
        table = pq.read_table(out / "traces" / op)
        result[op] = sorted(
            ({k: v for k, v in r.items() if k not in VOLATILE} for r in table.to_pylist()),
            key=lambda r: r["trace_id"],
        )
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_flow_with_real_bundled_teacher(prefect_server, sample_path, tmp_path):
    from memlora.flows.traces import generate_traces

    config = write_config(tmp_path / "c.yaml", TEACHER_REF, max_conversations=1, max_sessions=1, max_questions=2)
    out = tmp_path / "out"
    summary = generate_traces(config_path=str(config), data=str(sample_path), out=str(out))
    manifest = json.loads((out / "manifest.json").read_text())
    traced = manifest["traces"]["conversations"]
    assert len(traced) == 1
    for op in OPERATIONS:
        table = pq.read_table(out / "traces" / op / f"part-{traced[0]}.parquet")
        assert table.schema.metadata[b"memlora.schema_version"] == b"1"
        assert table.num_rows == summary[op]["rows"] > 0
        for row in table.to_pylist():
            assert row["constrained"] and row["model_id"].endswith(".gguf")
            assert row["messages"][-1]["role"] == "user"
            if row["parse_ok"]:  # constrained outputs that finished are valid under their own schema
                jsonschema.validate(json.loads(row["raw_output"]), json.loads(row["output_schema"]))
            else:
                assert row["finish_reason"] == "length" and row["parse_error"]
    files = {f["path"]: f for f in manifest["files"]}
    assert files["datasets/conversations.parquet"]["rows"] > 0
    assert all(len(f["sha256"]) == 64 for f in files.values())


def shards(out: Path) -> int:
    return len(list((out / "traces" / "generation").glob("part-*.parquet")))


def run_until(cmd: list[str], env: dict, out: Path, ready) -> None:
    """Start the traces command and SIGKILL its whole process group as soon as `ready(out)` holds."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not ready(out):
            assert proc.poll() is None, "the run finished before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    finally:
        stop_group(proc)


@pytest.mark.timeout(900)
def test_resume_after_sigkill_at_three_points_gives_the_same_rows(prefect_server, tiny_model_dir, sample_path,
                                                                  tmp_path):
    config = write_config(tmp_path / "c.yaml", str(tiny_model_dir), max_conversations=3, max_sessions=2,
                          max_questions=2)
    cmd = [sys.executable, "-m", "memlora.cli", "traces", "--config", str(config), "--data", str(sample_path)]
    env = dict(os.environ)

    reference = tmp_path / "reference"
    subprocess.run(cmd + ["--out", str(reference)], env=env, check=True, timeout=600, capture_output=True)
    expected = rows(reference)
    assert all(expected[op] for op in ("extraction", "generation")) and shards(reference) == 3

    # One output folder, killed three times, each run resuming the last: right after ingest (no trace yet),
    # with one conversation done and the next in flight, with two done.
    out = tmp_path / "interrupted"
    points = [lambda o: (o / "datasets" / "questions.parquet").is_file(), lambda o: shards(o) >= 1,
              lambda o: shards(o) >= 2]
    for k, ready in enumerate(points):
        run_until(cmd + ["--out", str(out)], env, out, ready)
        assert shards(out) == k  # a shard is only written when its conversation is complete
        for leftover in (out / "traces").rglob("*") if (out / "traces").exists() else []:
            # a killed write leaves only a hidden temp name behind, which no reader lists
            assert leftover.is_dir() or leftover.name.startswith("part-") or leftover.name.startswith(".")

    subprocess.run(cmd + ["--out", str(out)], env=env, check=True, timeout=600, capture_output=True)
    assert rows(out) == expected  # no duplicate, no missing row
