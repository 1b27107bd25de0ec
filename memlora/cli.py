"""`memlora` command line: a thin layer over the flows."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Offline by default: a bundled model must never wait on a hub that cannot be reached.
for _key, _value in {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}.items():
    os.environ.setdefault(_key, _value)

DEFAULT_CONFIG = "configs/default.yaml"


def _known_errors() -> tuple[type[BaseException], ...]:
    from memlora.config import ConfigError
    from memlora.data.io import DataError
    from memlora.models import ModelRefError

    return (ConfigError, DataError, ModelRefError)


def cmd_ingest(args) -> int:
    from memlora.config import DataConfig, load_config
    from memlora.data.ingest import ingest

    data_cfg = load_config(args.config).data if args.config else DataConfig()
    corpus = ingest(args.data, args.out, data_cfg)
    turns = sum(len(c.turns) for c in corpus)
    questions = sum(len(c.questions) for c in corpus)
    print(f"{len(corpus)} conversations, {turns} turns, {questions} questions -> {Path(args.out) / 'datasets'}")
    return 0


def cmd_traces(args) -> int:
    from memlora.config import load_config
    from memlora.flows.traces import generate_traces

    load_config(args.config)  # fail on a bad config before Prefect starts
    summary = generate_traces(config=args.config, data=args.data, out=args.out)
    for op, s in summary.items():
        print(f"{op:<11} {s['rows']:>5} calls  {s['parse_ok']:>5} parsed  -> {Path(args.out) / 'traces' / op}")
    return 0


def cmd_run(args) -> int:
    from memlora.config import load_config
    from memlora.flows.pipeline import pipeline

    load_config(args.config)
    pipeline(config=args.config, data=args.data, out=args.out)
    out = Path(args.out)
    print(f"pipeline finished: manifest at {out / 'manifest.json'}")
    report = out / "eval" / "report.md"
    if report.is_file():
        print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="memlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="normalize + validate input into OUT/datasets/*.parquet")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("traces", help="teacher traces (runs ingest first)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_traces)

    p = sub.add_parser("run", help="the whole pipeline (what `make run` calls)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--data", default="data/samples/locomo_sample.json")
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _known_errors() as err:
        print(f"memlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
