"""Student depth: the same expert trained on students of several depths, scored on the validation
conversation(s), next to each student's latency and size: the curve a user needs to pick a student size.
Writes bench/results/prune_depth.json.

    python bench/prune_depth.py --out OUT [--operation extraction[,update,...]]
        [--depths full,drop:4,drop:8,every:2,every:3]

OUT must hold a pipeline run's datasets and traces with a validation split (`data.split.validation_ratio`).
Each depth: the student is built with that prune rule (layers to drop chosen by angular distance on the
teacher's traces for `drop:N`), the operation's expert is trained through the real launcher with the
configured recipe (minimal prompt, cleaned targets, epochs with early stopping on validation), then it answers
the teacher's own validation requests under the same schema (several operations: one student per depth, built
and healed once, one expert per operation on it). Agreement with the teacher (the operation's
primary metric), parse rate, latency per call and parameters are reported per depth, and each depth's
latency relative to the unpruned student, measured in the same run. A depth ending in `+heal` (`drop:8+heal`)
heals the cut student first with the default `student.heal` settings and reports its teacher-student KL on
held-out validation text before and after.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from common import CONFIG, bench_parser, replay_agreement, save, table, validation_rows  # noqa: E402

from memlora.config import parse_config  # noqa: E402
from memlora.manifest import update_manifest  # noqa: E402
from memlora.student.build import build_student  # noqa: E402
from memlora.student.distill import distill_operation  # noqa: E402
from memlora.student.experts import ExpertBackend  # noqa: E402


def prune_rule(spec: str) -> dict | None:
    spec = spec.removesuffix("+heal")
    if spec == "full":
        return {"from": "teacher", "every": 1}  # every layer: the unpruned teacher as student
    kind, _, n = spec.partition(":")
    return {"from": "teacher", kind: int(n)}


def depth_config(raw: dict, spec: str, quick: bool, epochs: int | None) -> dict:
    raw = json.loads(json.dumps(raw))
    raw["student"]["prune"] = prune_rule(spec)
    raw["student"].pop("heal", None)
    if spec.endswith("+heal"):
        raw["student"]["heal"] = {"max_tokens": 4096, "chunk_tokens": 128, "held_out_tokens": 512} if quick else {}
    if epochs:
        raw["distill"]["max_epochs"] = epochs
    if quick:
        raw["distill"].update(max_epochs=1, max_steps=2)
    return raw


def depth_result(config, scratch: Path, spec: str, operation: str, base: Path, marker: dict, rows: list[dict],
                 budget: int) -> dict:
    started = time.perf_counter()
    record = distill_operation(config, scratch, operation, base, on_line=lambda line: None)
    train_s = time.perf_counter() - started
    update_manifest(scratch)
    backend = ExpertBackend(base, {operation: scratch / "adapters" / operation}, device="cpu",
                            batch_size=config.teacher.batch_size, prompt=config.student.prompt)
    params = sum(p.numel() for p in backend.model.parameters())
    result = {"depth": spec, "operation": operation, "layers": len(marker["kept_layers"]),
              "kept": marker["kept_layers"], "parameters": params,
              **{k: v for k, v in replay_agreement(operation, rows, backend, budget).items() if k != "token_ids"},
              "best_epoch": record.best_epoch, "train_s": round(train_s, 1)}
    if "healing" in marker:
        result.update(heal_kl=[marker["healing"]["kl_before"], marker["healing"]["kl_after"]],
                      heal_s=marker["healing"]["wall_time_s"])
    return result


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--operation", default="extraction", help="one operation or several, comma-separated")
    parser.add_argument("--depths", default="full,drop:4,drop:8,every:2,every:3")
    parser.add_argument("--epochs", type=int, default=None, help="override distill.max_epochs (same for every depth)")
    args = parser.parse_args()
    if not args.out:
        parser.error("--out OUT (a pipeline run with a validation split) is required")
    out = Path(args.out)
    raw = yaml.safe_load(CONFIG.read_text())
    operations = args.operation.split(",")
    limit = 4 if args.quick else None
    budgets = {op: raw["memory"]["operations"][op]["max_new_tokens"] for op in operations}
    requests = {op: validation_rows(out, op, limit) for op in operations}
    for op, rows in requests.items():
        if not rows:
            parser.error(f"{out}: no parse_ok validation rows for {op} (is data.split.validation_ratio set?)")
    results = []
    for spec in args.depths.split(","):
        scratch = Path(tempfile.mkdtemp(prefix="prune-depth-"))
        try:
            for folder in ("datasets", "traces"):
                shutil.copytree(out / folder, scratch / folder)
            config_raw = depth_config(raw, spec, args.quick, args.epochs)
            path = scratch / "config.yaml"
            path.write_text(yaml.safe_dump(config_raw))
            config = parse_config(config_raw, path)
            base = build_student(config, scratch)
            marker = json.loads((base / "memlora_student.json").read_text())
            for op in operations:
                result = depth_result(config, scratch, spec, op, base, marker, requests[op], budgets[op])
                results.append(result)
                print(json.dumps({k: v for k, v in result.items() if k != "kept"}), flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    for op in operations:
        mine = [r for r in results if r["operation"] == op]
        ref = next((r for r in mine if r["depth"] == "full"), mine[0])
        for r in mine:
            r["latency_vs_full"] = f"{r['latency_per_call_s'] / ref['latency_per_call_s']:.2f}x"
            r["params_vs_full"] = f"{r['parameters'] / ref['parameters']:.2f}x"
    print(table(results, ["operation", "depth", "layers", "agreement", "ci", "parse_ok", "latency_per_call_s",
                          "latency_vs_full", "params_vs_full", "best_epoch", "train_s", "heal_kl", "n"]))
    record = {"operation": args.operation, "quick": args.quick, "epochs": args.epochs, "depths": results}
    print(f"saved {save('prune_depth', record)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
