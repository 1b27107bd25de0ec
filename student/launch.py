"""Launch one expert's training through the `deepspeed` launcher and stream its log.

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


def launcher_command(config: Config, out: str, operation: str, base: str, cache: dict,
                     init: str | None = None) -> tuple[list[str], dict]:
    """The ranks get one job file: the config, the base, the adapter to start from (if any), and the cache key
    rank 0 writes into training.json."""
    job = write_job(config, out, f"expert-{operation}", task="expert", operation=operation,
                    base=str(Path(base).resolve()), cache=cache, init=str(Path(init).resolve()) if init else None)
    return deepspeed_command(config, ["--job", str(job)])


def run_training(config: Config, out: str, operation: str, base: str, cache: dict,
                 on_line: Callable[[str], None] = print, init: str | None = None) -> dict:
    """Train `operation`'s expert (from the adapter folder `init`, else a fresh one); `cache` (traces sha256,
    config fingerprint, key) is written into training.json by rank 0."""
    return run_ranks(config, *launcher_command(config, out, operation, base, cache, init), operation, on_line)


def run_ranks(config: Config, cmd: list[str], env: dict, operation: str,
              on_line: Callable[[str], None] = print) -> dict:
    """Run the launcher, forward each log line, and return rank 0's record (its MEMLORA_RESULT line)."""
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
        raise TrainingFailed(f"{operation}: training exceeded distill.timeout_s={config.distill.timeout_s} and was "
                             "killed; last lines:\n" + "\n".join(tail))
    if code != 0 or record is None:
        raise TrainingFailed(f"{operation}: a DeepSpeed rank failed (exit code {code}); last lines:\n" + "\n".join(tail))
    return record
