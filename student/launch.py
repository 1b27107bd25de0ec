"""Launch the experts' training through the `deepspeed` launcher and stream its log.

GPUs: `--num_gpus` from `distill.num_gpus`, default all visible. No GPU: DeepSpeed's CPU accelerator with
`distill.num_ranks` ranks (gloo), the same code path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from memlora.config import Config
from memlora.jobs import write_job
from memlora.processes import free_port, track, untrack


class TrainingFailed(RuntimeError):
    pass


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # a broken CUDA install counts as none
        return 0


def deepspeed_command(config: Config, entry_args: list[str]) -> tuple[list[str], dict]:
    """`deepspeed ... --module memlora.student.train_entry <entry_args>` and its environment."""
    env = dict(os.environ)
    gpus = gpu_count()
    if gpus and env.get("DS_ACCELERATOR", "") != "cpu":
        ranks = config.distill.num_gpus or gpus
    else:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
        ranks = config.distill.num_ranks
    # Ranks run on this machine's cores; keep them from oversubscribing one another.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // ranks)))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or shutil.which("deepspeed")
    if launcher is None:
        raise TrainingFailed("the `deepspeed` launcher is not installed in this environment")
    cmd = [
        launcher, "--num_gpus", str(ranks), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        "--no_local_rank", "--module", "memlora.student.train_entry", *entry_args,
    ]
    return cmd, env


@dataclass(frozen=True)
class ExpertJob:
    """One expert for a launch to train: its operation, the cache key rank 0 writes into its training.json
    (traces sha256, config fingerprint, key), and the adapter folder to start from (None: a fresh expert)."""

    operation: str
    cache: dict
    init: str | None = None


def launcher_command(config: Config, out: str, base: str, jobs: list[ExpertJob]) -> tuple[list[str], dict]:
    """The ranks get one job file: the config, the base, and each expert's operation, cache key and start."""
    job = write_job(config, out, "experts-" + "-".join(j.operation for j in jobs), task="experts",
                    base=str(Path(base).resolve()),
                    experts=[{"operation": j.operation, "cache": j.cache,
                              "init": str(Path(j.init).resolve()) if j.init else None} for j in jobs])
    return deepspeed_command(config, ["--job", str(job)])


def run_trainings(config: Config, out: str, base: str, jobs: list[ExpertJob],
                  on_line: Callable[[str], None] = print,
                  on_record: Callable[[dict], None] = lambda record: None) -> dict[str, dict]:
    """Train every expert of `jobs` in one launch, one after another: the launcher, the ranks' imports and their
    process group are paid once (12-20 s an expert on 2 cores, bench/training_step.py). `on_record` sees each
    record as its expert is saved; a failure names the expert that was training, and those saved before it stay
    saved."""
    cmd, env = launcher_command(config, out, base, jobs)
    records: dict[str, dict] = {}

    def saved(record: dict) -> None:
        records[record["operation"]] = record
        on_record(record)

    def training() -> str:
        return next((j.operation for j in jobs if j.operation not in records), jobs[-1].operation)

    run_ranks(config, cmd, env, training, on_line, saved)
    missing = [j.operation for j in jobs if j.operation not in records]
    if missing:
        raise TrainingFailed(f"{missing[0]}: the DeepSpeed ranks exited without its record")
    return records


def run_training(config: Config, out: str, operation: str, base: str, cache: dict,
                 on_line: Callable[[str], None] = print, init: str | None = None) -> dict:
    """Train `operation`'s expert alone (from the adapter folder `init`, else a fresh one)."""
    return run_trainings(config, out, base, [ExpertJob(operation, cache, init)], on_line)[operation]


def run_ranks(config: Config, cmd: list[str], env: dict, what: str | Callable[[], str],
              on_line: Callable[[str], None] = print,
              on_record: Callable[[dict], None] | None = None) -> dict:
    """Run the launcher, forward each log line, and return rank 0's (last) record, its MEMLORA_RESULT line.
    `what` names the work (a callable: the work going on now) in errors; `distill.timeout_s` is the limit of
    each piece of work, restarted at each record; `on_record` sees every record as its line arrives."""
    name = what if callable(what) else (lambda: what)
    on_line("launching: " + " ".join(cmd))
    tail: deque[str] = deque(maxlen=40)
    record = None
    proc = track(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                  bufsize=1, start_new_session=True))
    timed_out = threading.Event()

    def kill_group() -> None:
        timed_out.set()
        try:
            os.killpg(proc.pid, 9)
        except ProcessLookupError:
            pass

    watchdog = threading.Timer(config.distill.timeout_s, kill_group)
    watchdog.start()
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if "MEMLORA_RESULT " in line:
                record = json.loads(line.split("MEMLORA_RESULT ", 1)[1])
                watchdog.cancel()
                if on_record is not None:
                    on_record(record)
                watchdog = threading.Timer(config.distill.timeout_s, kill_group)
                watchdog.start()
                continue
            tail.append(line)
            on_line(line)
        code = proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            kill_group()
            proc.wait()
        untrack(proc)
    if timed_out.is_set():
        raise TrainingFailed(f"{name()}: training exceeded distill.timeout_s={config.distill.timeout_s} and was "
                             "killed; last lines:\n" + "\n".join(tail))
    if code != 0 or record is None:
        raise TrainingFailed(f"{name()}: a DeepSpeed rank failed (exit code {code}); last lines:\n"
                             + "\n".join(tail))
    return record
