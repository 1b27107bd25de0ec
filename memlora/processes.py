"""Stopping the process groups we start (Prefect server and worker, evaluation systems, test servers)."""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the process group, then SIGKILL what is left (a worker can outlive its first SIGTERM).
    The process must have been started with `start_new_session=True`, so its group holds only its own tree."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return
