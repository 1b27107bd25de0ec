"""The script every DeepSpeed rank runs: `deepspeed ... --module memlora.student.train_entry --job JOB.json`."""

from __future__ import annotations

import argparse
import json
import sys

from memlora.jobs import read_job
from memlora.student.heal import heal_base
from memlora.student.records import TrainingRecord
from memlora.student.trainer import train_expert


def skip_shared_memory_all_reduce() -> None:
    """DeepSpeed's CPU backend builds its shared-memory all-reduce op (a C++ extension compiled on first use)
    whenever it initialises, yet only inference's all-reduce calls it; training's gradients go through gloo.
    Building it cost 41 s on a fresh 2-core machine (~10 s to load per launch), and each rank then maps a 66 MB
    /dev/shm buffer and spins until every peer's exists: two-rank launches hung in CI where one-rank launches
    (which never built it) passed. Marking the op unavailable makes DeepSpeed skip it, as it does on a machine
    without a compiler."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--job", required=True, help="the job file the launching process wrote (memlora.jobs)")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by some launchers; LOCAL_RANK rules
    args = parser.parse_args(argv)
    config, job = read_job(args.job)
    skip_shared_memory_all_reduce()
    if job["task"] == "heal":
        report(heal_base(config, job["out"], job["base"], job["target"]))
        return 0
    for i, expert in enumerate(job["experts"]):
        if i:
            forget_last_trainer()
        report(train_expert(config, job["out"], expert["operation"], job["base"], expert["cache"], expert["init"]))
    return 0


def report(record: TrainingRecord | dict | None) -> None:
    """Rank 0's record, one line the launching process reads (other ranks return None)."""
    if isinstance(record, TrainingRecord):
        record = record.to_dict(on_disk=True)
    if record is not None:
        print("MEMLORA_RESULT " + json.dumps(record), flush=True)


def forget_last_trainer() -> None:
    """Start the next expert of the launch from the state a fresh rank would have: accelerate keeps its
    DeepSpeed plugin and gradient state in process-wide singletons, transformers the last ZeRO config (which
    `from_pretrained` would obey under ZeRO-3); the process group stays. Tested: the experts of one launch equal
    those of one launch each, tensor for tensor."""
    import gc

    import torch
    from accelerate.state import AcceleratorState, GradientState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
