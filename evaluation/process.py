"""Each system's evaluation in an OS process of its own (so memory peaks never mix), followed as it runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from memlora.config import Config
from memlora.evaluation.cache import cache_key, finished_probe
from memlora.evaluation.probes import Probe
from memlora.evaluation.systems import JUDGE, EvalError, systems
from memlora.jobs import write_job
from memlora.layout import log_path, probe_path, system_folder
from memlora.models import OFFLINE_ENV
from memlora.processes import stop_group, track, untrack


PROGRESS = re.compile(r"^\[\d\d:\d\d:\d\d\] ")  # run_system.say's lines; the rest is library noise


def wait_following(proc: subprocess.Popen, log: Path, timeout_s: float, on_line: Callable[[str], None]) -> int:
    """Wait for the process, passing each new progress line of its log to `on_line`."""
    deadline = time.monotonic() + timeout_s
    with open(log, "rb") as reader:
        pending = b""
        while True:
            try:
                rc = proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                rc = None
            pending += reader.read()
            *lines, pending = pending.split(b"\n")
            for line in lines:
                text = line.decode(errors="replace").rstrip()
                if PROGRESS.match(text):
                    on_line(text)
            if rc is not None:
                return rc
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(proc.args, timeout_s)


def run_system_process(config: Config, out: str | Path, system: str, *, base: str | Path | None = None,
                       timeout_s: float = 7200, env: dict | None = None,
                       on_line: Callable[[str], None] = lambda line: None) -> Probe:
    """Run one system (or the judge) in a fresh Python process; return the probe record it wrote.

    Its output goes to OUT/eval/logs/<system>.log; its progress lines (`[HH:MM:SS] ...`) are passed to
    `on_line` as they come, so a user sees where a minutes-long run is. A failure raises with the log's last
    lines."""
    if system not in (*systems(config), JUDGE):
        raise EvalError(f"unknown system {system!r}")
    key = cache_key(config, out, system, base)
    kept = finished_probe(out, system, key)
    if kept is not None:
        kept.kept = True
        return kept
    job = write_job(config, out, f"eval-{system_folder(system)}", system=system,
                    base=str(Path(base).resolve()) if base is not None else None)
    cmd = [sys.executable, "-m", "memlora.evaluation.run_system", "--job", str(job)]
    log = log_path(out, system)
    log.parent.mkdir(parents=True, exist_ok=True)
    probe_path(out, system).unlink(missing_ok=True)
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    with open(log, "wb") as fh:
        proc = track(subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env,
                                      start_new_session=True))
        try:
            rc = wait_following(proc, log, timeout_s, on_line)
        except BaseException:  # timeout or interrupt: leave no orphan model process behind
            stop_group(proc)
            raise
        finally:
            untrack(proc)
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise EvalError(f"evaluation of {system!r} failed (exit code {rc}); see {log}:\n{tail}")
    probe = Probe.read(probe_path(out, system))
    probe.cache_key = key
    probe.write(probe_path(out, system))
    return probe
