"""One writer per OUT (memlora.outlock): the nightly pipeline, the nightly improve and a command run by hand take
turns on one OUT. A holder in another process makes the next one wait and say for whom, a killed holder frees the
lock with its process, and a flow's subflows re-enter their parent's lock."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memlora.layout import lock_path
from memlora.outlock import OutBusy, out_lock
from tests.conftest import BIN, REPO

HOLDER = "nightly pipeline (test)"


def hold(out, seconds: float) -> subprocess.Popen:
    """Another process that holds OUT's lock for `seconds` (or until killed); returns once it holds it."""
    code = textwrap.dedent(f"""
        import sys, time
        from memlora.outlock import out_lock
        with out_lock({str(out)!r}, {HOLDER!r}):
            print("held", flush=True)
            time.sleep({seconds})
        print("released", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.timeout(60)
def test_a_second_writer_waits_for_the_first_and_a_killed_holder_frees_the_lock(tmp_path):
    out = tmp_path / "out"
    holder = hold(out, 600)
    try:
        with pytest.raises(OutBusy, match=rf"in use by {re.escape(HOLDER)} \(pid {holder.pid} on .*since"):
            with out_lock(out, "improve", wait_s=0.3, poll_s=0.05):
                pass
        told: list[str] = []
        started = time.monotonic()
        holder.send_signal(signal.SIGKILL)  # no clean-up runs: the lock goes with the process
        with out_lock(out, "improve", wait_s=30, poll_s=0.05, on_wait=told.append):
            assert time.monotonic() - started < 30
            assert '"holder": "improve"' in lock_path(out).read_text()
            with out_lock(out, "improve's subflow", wait_s=0):  # the same process: re-entered, not waited for
                pass
        assert all(HOLDER in line for line in told)
    finally:
        holder.kill()
        holder.wait()
    assert lock_path(out).is_file()  # the file stays; only its lock comes and goes
    with out_lock(out, "next", wait_s=0):
        pass


@pytest.mark.timeout(120)
def test_a_command_waits_for_a_flow_on_the_same_out_and_says_for_whom(tmp_path):
    out = tmp_path / "out"
    (out / "traces").mkdir(parents=True)
    holder = hold(out, 4)
    result = subprocess.run([str(BIN / "memlora"), "compact", "--out", str(out)], cwd=REPO, capture_output=True,
                            text=True, timeout=90)
    assert holder.poll() is not None and holder.stdout.read().strip() == "released"  # it ran after, not beside
    assert result.returncode == 0, result.stderr
    assert f"{out} is in use by {HOLDER} (pid {holder.pid}" in result.stderr
    assert "no traces" in result.stdout
    # a command that would only create OUT, or only lists, does not wait for anyone
    missing = subprocess.run([str(BIN / "memlora"), "compact", "--out", str(tmp_path / "none")], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no such folder" in missing.stderr and not (tmp_path / "none").exists()


@pytest.mark.timeout(180)
def test_the_nightly_improve_waits_for_the_pipeline_on_its_out(prefect_server, tmp_path):
    from memlora.flows.improve import improve

    out = tmp_path / "out"
    holder = hold(out, 5)
    result = improve(config_path=str(REPO / "configs" / "default.yaml"), out=str(out))
    assert holder.poll() is not None and holder.stdout.read().strip() == "released"
    assert result == {"new_rows": {}, "promoted": [], "recalibrated": []}
