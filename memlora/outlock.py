"""One writer per OUT at a time.

The nightly pipeline, the nightly `improve` and a command run by hand can meet on one OUT: `prefect.yaml` runs both
flows on `out`, and a pipeline on a team's data can outlast the hour between them. Each rewrites the manifest from
what it sees (a lost update there makes serve-experts refuse the experts it lists), replaces experts and refits
deferral thresholds. So every flow and command that changes OUT holds OUT's lock while it runs; the next one waits
for it and says whom it waits for. An flock lock goes with its process: a killed run leaves nothing to clean up.
The servers (`capture`, `serve-experts`) only add trace shards of their own and never take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator

from memlora.layout import lock_path

_held: dict[str, int] = {}  # resolved OUT -> depth held in this process: a flow's subflows run in its process
_guard = threading.Lock()


class OutBusy(RuntimeError):
    """OUT's lock was not free within the time allowed."""


class OutMissing(RuntimeError):
    """A flow that works on an existing OUT (distill, evaluate, improve) was given a folder that is not there: a
    mistyped OUT must fail, not leave an empty folder behind or report a nightly run that had nothing to do."""


def holder(out: str | Path) -> str:
    """Who holds (or last held) OUT's lock, in words, from what the holder wrote into the lock file."""
    try:
        info = json.loads(lock_path(out).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return "another run"
    if not info:
        return "another run"
    return f"{info.get('holder', 'a run')} (pid {info.get('pid')} on {info.get('host')}, since {info.get('since')})"


def require_out(out: str | Path, name: str) -> None:
    if not Path(out).is_dir():
        raise OutMissing(f"{out}: no such folder (give the OUT that `memlora run`, `memlora traces` or "
                         f"`memlora capture` wrote; {name} works on what is in it)")


@contextmanager
def out_lock(out: str | Path, name: str, *, wait_s: float | None = None, poll_s: float = 1.0,
             on_wait: Callable[[str], None] | None = None, remind_s: float = 600.0) -> Iterator[None]:
    """Hold OUT's writer lock for the block (`name` says who in the lock file). Re-entrant within a process. Where
    another process holds it: `on_wait(holder)` once and every `remind_s`, polling every `poll_s`, until it is
    free or `wait_s` has passed (then OutBusy naming the holder); `wait_s` None waits as long as it takes."""
    key = str(Path(out).resolve())
    with _guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield
        finally:
            with _guard:
                _held[key] -= 1
        return
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="utf-8")
    try:
        _acquire(handle, out, wait_s, poll_s, on_wait, remind_s)
        _say_who(handle, name)
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                del _held[key]
    finally:
        handle.close()  # releases the lock; the file stays (removing it would let two holders lock two files)


def _say_who(handle, name: str) -> None:
    """Who holds the lock, for the message of the next one to wait: best effort (a full disk must not fail the
    run that holds the lock; the one waiting then reads "another run")."""
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"holder": name, "pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                 "argv": sys.argv[:4]}))
        handle.flush()
    except OSError:
        pass


def _acquire(handle, out, wait_s, poll_s, on_wait, remind_s) -> None:
    started = time.monotonic()
    told = None
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        waited = time.monotonic() - started
        if wait_s is not None and waited >= wait_s:
            raise OutBusy(f"{out}: in use by {holder(out)}; waited {waited:.0f} s. Run again when it has "
                          "finished (one flow or command changes an OUT at a time)")
        if on_wait is not None and (told is None or time.monotonic() - told >= remind_s):
            on_wait(holder(out))
            told = time.monotonic()
        time.sleep(poll_s if wait_s is None else max(0.0, min(poll_s, wait_s - waited)))
