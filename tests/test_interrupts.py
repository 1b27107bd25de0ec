"""Ctrl-C (SIGINT to the terminal's process group) or SIGTERM stops a command within seconds, with every
process it started gone (DeepSpeed ranks and evaluation systems run in sessions of their own, and Prefect's
temporary server), and a rerun then resumes as it does after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from memlora.processes import stop_group
from tests.conftest import BIN, REPO, SAMPLE
from tests.test_deployments import tiny_config


def cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}  # Prefect's temporary server
    return {**env, "DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def has_child(pid: int, text: str) -> bool:
    for child in descendants(pid):
        try:
            if text in " ".join(child.cmdline()):
                return True
        except psutil.Error:
            continue
    return False


def interrupt(args: list[str], sig: signal.Signals, ready: str, tmp_path: Path) -> tuple[int, float, str]:
    """Start `memlora ARGS` as a terminal would (its own process group), wait until a descendant's command
    line contains `ready`, send `sig` (SIGINT to the whole group, as Ctrl-C does; SIGTERM to the command), and
    return (exit code, seconds to exit, stderr) once every process of its tree is gone."""
    log = tmp_path / f"{args[0]}-{sig.name}.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(BIN / "memlora"), *args], cwd=REPO, env=cli_env(), stdout=fh, stderr=fh,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not has_child(proc.pid, ready):
            assert proc.poll() is None, f"exited before {ready!r} started:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{ready!r} never started:\n{log.read_text()[-3000:]}"
            time.sleep(0.1)
        time.sleep(1.0)
        tree = descendants(proc.pid)
        sent = time.monotonic()
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        code = proc.wait(timeout=30)
        took = time.monotonic() - sent
        alive = []
        for p in tree:
            try:
                p.wait(timeout=max(0.1, sent + 15 - time.monotonic()))
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                alive.append(" ".join(p.cmdline())[:200])
        assert not alive, f"left running after {sig.name}: {alive}"
        return code, took, log.read_text(errors="replace")
    finally:
        stop_group(proc, grace_s=2)


@pytest.mark.prefect
@pytest.mark.timeout(900)
def test_interrupts_stop_every_command_and_its_children(prefect_server, tiny_model_dir, tmp_path):
    config = str(tiny_config(tmp_path / "c.yaml", tiny_model_dir))
    out = str(tmp_path / "out")
    common = ["--config", config, "--out", out]

    def finish(*args: str) -> None:
        """The rerun after an interrupt, on the shared server (what is under test is the interrupted run's own
        temporary server)."""
        env = {**cli_env(), "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
        done = subprocess.run([str(BIN / "memlora"), *args, *common], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=400)
        assert done.returncode == 0, done.stderr[-3000:]

    # traces: SIGTERM once Prefect's temporary server is up
    code, took, log = interrupt(["traces", "--data", str(SAMPLE), *common], signal.SIGTERM, "uvicorn", tmp_path)
    assert code == 128 + signal.SIGTERM and took < 15 and "SIGTERM: stopping" in log, log[-2000:]
    finish("traces", "--data", str(SAMPLE))

    # distill: SIGTERM while a DeepSpeed rank trains; the rerun trains what was not finished
    code, took, log = interrupt(["distill", *common], signal.SIGTERM, "memlora.student.train_entry", tmp_path)
    assert code == 128 + signal.SIGTERM and took < 15, log[-2000:]
    finish("distill")
    assert (Path(out) / "adapters" / "extraction" / "adapter_model.safetensors").is_file()

    # evaluate: Ctrl-C while the teacher's evaluation process (its own session) runs
    code, took, log = interrupt(["evaluate", *common], signal.SIGINT, "memlora.evaluation.run_system", tmp_path)
    assert code == 128 + signal.SIGINT and took < 15 and "SIGINT: stopping" in log, log[-2000:]

    # run: Ctrl-C with the whole pipeline going
    code, took, log = interrupt(["run", "--data", str(SAMPLE), *common], signal.SIGINT, "uvicorn", tmp_path)
    assert code == 128 + signal.SIGINT and took < 15, log[-2000:]
