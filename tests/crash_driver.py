"""Runs one stage in a child process and SIGKILLs it (and every process it started) at a chosen point, the
way a lost machine or an OOM kill would stop it: no `finally`, no atexit, no cleanup.

    python -m tests.crash_driver distill CONFIG OUT BASE [OPERATION:TEXT]   (kill at the first log line of
        OPERATION's training that contains TEXT)
    python -m tests.crash_driver release CONFIG DATA OUT [copy|card|link]   (kill inside publish_release)
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil


def crash() -> None:
    for child in psutil.Process().children(recursive=True):
        child.kill()
    os.kill(os.getpid(), signal.SIGKILL)


def distill(config_path: str, out: str, base: str, trigger: str = "") -> None:
    from memlora.config import OPERATIONS, load_config
    from memlora.student.distill import distill_operation

    operation, _, text = trigger.partition(":")
    config = load_config(config_path)
    for op in OPERATIONS:
        def on_line(line: str, op: str = op) -> None:
            print(f"[{op}] {line}", flush=True)
            if op == operation and text in line:
                crash()

        record = distill_operation(config, out, op, Path(base), on_line)
        print(f"DONE {op} skipped={bool(getattr(record, 'skipped', False))}", flush=True)


def release(config_path: str, data: str, out: str, point: str = "") -> None:
    import memlora.release as rel
    from memlora.config import load_config

    if point == "copy":  # after the first file is copied into the hidden staging folder
        real_copy = rel.shutil.copy2
        rel.shutil.copy2 = lambda *a, **k: (real_copy(*a, **k), crash())
    elif point == "card":  # manifest written, dataset card not yet
        rel.dataset_card = lambda manifest: crash()
    elif point == "link":  # release folder renamed into place, `latest` not yet moved
        rel.os.replace = lambda *a, **k: crash()
    print(rel.publish_release(out, load_config(config_path), data).path, flush=True)


if __name__ == "__main__":
    {"distill": distill, "release": release}[sys.argv[1]](*sys.argv[2:])
