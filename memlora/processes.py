"""Stopping the process groups we start (Prefect server and worker, evaluation systems, DeepSpeed launchers,
test servers), also when the command itself is interrupted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager
from typing import Callable

_children: dict[subprocess.Popen, Callable[[], None] | None] = {}
_lock = threading.Lock()


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


def track(proc: subprocess.Popen, cleanup: Callable[[], None] | None = None) -> subprocess.Popen:
    """Remember a child started in its own session: an interrupt of this process must stop it too (a signal
    to the terminal's process group does not reach another session). `cleanup` runs once it is stopped
    (e.g. removing the shared-memory files its ranks leave)."""
    with _lock:
        _children[proc] = cleanup
    return proc


def untrack(proc: subprocess.Popen) -> None:
    with _lock:
        _children.pop(proc, None)


def stop_everything(grace_s: float = 3.0) -> None:
    """Stop every tracked child group and Prefect's temporary API server, if this process started one."""
    with _lock:
        procs, cleanups = list(_children), [c for c in _children.values() if c is not None]
    for proc in procs:
        stop_group(proc, grace_s)
    for cleanup in cleanups:
        try:
            cleanup()
        except OSError:
            pass
    module = sys.modules.get("prefect.server.api.server")
    if module is not None:  # Prefect starts a temporary server when no PREFECT_API_URL is set
        for server in list(module.SubprocessASGIServer._instances.values()):
            server.stop()  # terminate, then kill after 5 s

@contextmanager
def exit_on_interrupt(command: str):
    """SIGINT or SIGTERM: stop every child and the temporary server, then exit at once (128 + signal).
    Unwinding through Prefect instead would have it report to a server that Ctrl-C has already killed, and
    retry for minutes. Every artifact is written atomically, so a rerun resumes as after a crash."""

    def handler(signum, _frame) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not interrupt the cleanup
        name = signal.Signals(signum).name
        print(f"memlora {command}: {name}: stopping its processes; a rerun resumes where this one stopped",
              file=sys.stderr, flush=True)
        try:
            stop_everything()
        finally:
            sys.stdout.flush()
            os._exit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def free_port() -> int:
    """A TCP port on 127.0.0.1 free right now, for a server or launcher we are about to start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
