"""The script every DeepSpeed rank runs: `deepspeed ... --module memlora.student.train_entry --config ...`."""

from __future__ import annotations

import argparse
import json
import sys

from memlora.config import load_config
from memlora.student.records import TrainingRecord
from memlora.student.trainer import train_expert


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--task", choices=["expert", "heal"], default="expert")
    parser.add_argument("--operation", default="")
    parser.add_argument("--target", default="")  # heal: the healed base's folder
    parser.add_argument("--base", required=True)
    parser.add_argument("--cache-key", default="")
    parser.add_argument("--traces-sha256", default="")
    parser.add_argument("--config-fingerprint", default="")
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by some launchers; LOCAL_RANK rules
    args = parser.parse_args(argv)
    cache = {"key": args.cache_key, "traces_sha256": args.traces_sha256, "config_fingerprint": args.config_fingerprint}
    config = load_config(args.config)
    if args.task == "heal":
        from memlora.student.heal import heal_base

        record = heal_base(config, args.out, args.base, args.target)
    else:
        record = train_expert(config, args.out, args.operation, args.base, cache)
    if isinstance(record, TrainingRecord):
        record = record.to_dict(on_disk=True)
    if record is not None:
        print("MEMLORA_RESULT " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
