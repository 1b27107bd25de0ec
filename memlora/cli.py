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
    from memlora.flows.traces import TracesIncomplete
    from memlora.manifest import UntrustedArtifact
    from memlora.models import ModelRefError
    from memlora.release import VerifyError
    from memlora.student.launch import TrainingFailed
    from memlora.teacher.http_backend import SchemaRejected, TeacherUnavailable

    return (ConfigError, DataError, ModelRefError, TracesIncomplete, TrainingFailed, TeacherUnavailable,
            SchemaRejected, UntrustedArtifact, VerifyError)


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


def cmd_distill(args) -> int:
    from memlora.config import load_config
    from memlora.flows.distill import distill

    load_config(args.config)
    records = distill(config=args.config, out=args.out)
    for op, r in records.items():
        if r.get("no_expert"):
            print(f"{op:<11} no expert: {r['reason']}")
            continue
        note = " (kept: already trained)" if r.get("skipped") else ""
        print(f"{op:<11} loss {r['loss_before']:.4f} -> {r['loss_after']:.4f}  {r['steps']} steps{note}"
              f"  -> {Path(args.out) / 'adapters' / op}")
    return 0


def cmd_export(args) -> int:
    from memlora.student.export import export_lora

    written = export_lora(args.out, args.base, args.rank)
    if not written:
        print(f"memlora export: error: no trained experts under {Path(args.out) / 'adapters'}", file=sys.stderr)
        return 2
    for op, path in written.items():
        print(f"{op:<11} -> {path}")
    return 0


def cmd_evaluate(args) -> int:
    from memlora.config import load_config
    from memlora.evaluation.systems import EvalError
    from memlora.flows.evaluation import evaluate

    load_config(args.config)
    try:
        result = evaluate(config=args.config, out=args.out)
    except EvalError as err:
        print(f"memlora evaluate: error: {err}", file=sys.stderr)
        return 2
    for row in result["headline"]:
        print("  ".join(f"{k}={v}" for k, v in row.items()))
    eval_dir = Path(args.out) / "eval"
    print(f"results: {eval_dir / 'results.parquet'}  report: {eval_dir / 'report.md'}, {eval_dir / 'report.png'}")
    return 0


def cmd_verify(args) -> int:
    from memlora.release import VerifyError, verify_release

    try:
        problems = verify_release(args.path)
    except VerifyError as err:
        print(f"memlora verify: error: {err}", file=sys.stderr)
        return 2
    if problems:
        for problem in problems:
            print(f"memlora verify: {problem}", file=sys.stderr)
        print(f"memlora verify: {args.path}: {len(problems)} difference(s) from the manifest", file=sys.stderr)
        return 1
    print(f"{args.path}: matches its manifest")
    return 0


def cmd_release(args) -> int:
    from memlora.config import load_config
    from memlora.release import publish_release

    release = publish_release(args.out, load_config(args.config), args.data, name=args.name)
    print(f"release: {release}  (latest -> {release.name})")
    return 0


def cmd_serve(args) -> int:
    from memlora.serve import serve

    return serve(host=args.host, port=args.port, pool=args.pool, deploy=not args.no_deploy)


def cmd_run(args) -> int:
    from memlora.config import load_config
    from memlora.flows.pipeline import pipeline

    load_config(args.config)
    pipeline(config=args.config, data=args.data, out=args.out)
    out = Path(args.out)
    print(f"pipeline finished: manifest at {out / 'manifest.json'}, release under {out / 'releases'}")
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

    p = sub.add_parser("distill", help="DeLoRA experts from OUT/traces")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="experts as plain LoRA adapters")
    p.add_argument("--out", required=True)
    p.add_argument("--format", choices=["lora"], default="lora")
    p.add_argument("--base", default=None,
                   help="student base (default: OUT/student/base, else the base the experts were trained on)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the expert's own)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="teacher vs student vs student+experts on the test conversations")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("verify", help="check a dataset release against its manifest")
    p.add_argument("path")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("release", help="publish OUT's Parquet datasets as a versioned release (the pipeline's last step)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--data", required=True, help="the source data the datasets were made from (fingerprinted)")
    p.add_argument("--out", required=True)
    p.add_argument("--name", default=None, help="dataset name (default: <config name>-traces)")
    p.set_defaults(func=cmd_release)

    p = sub.add_parser("serve", help="local Prefect server + process worker with the deployments of prefect.yaml")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4200)
    p.add_argument("--pool", default="memlora-pool")
    p.add_argument("--no-deploy", action="store_true")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("run", help="the whole pipeline (what `make run` calls)")
    p.add_argument("--config", default=DEFAULT_CONFIG)
    p.add_argument("--data", default="data/samples/locomo_sample12.json")
    p.add_argument("--out", default="out")
    p.set_defaults(func=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from contextlib import nullcontext

    from memlora.processes import exit_on_interrupt

    # serve stops its own server and worker on a signal
    guard = nullcontext() if args.command == "serve" else exit_on_interrupt(args.command)
    try:
        with guard:
            return args.func(args)
    except _known_errors() as err:
        print(f"memlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # disk full, permissions: the message names the path; earlier artifacts are intact
        print(f"memlora {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
