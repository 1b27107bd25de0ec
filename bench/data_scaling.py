"""How many captured calls before the experts are worth serving: experts trained on 1, 3, 6 and all of a run's
training conversations, scored on the same held-out calls. Writes bench/results/data_scaling.json.

    python bench/data_scaling.py --out OUT [--sizes 1,3,6,all] [--operations extraction,update,generation]
    python bench/data_scaling.py --quick --out OUT      # CI: blocks of OUT's trace rows, one operation

OUT is a finished `memlora run` (its traces, datasets with a validation split, the student, and an evaluation whose
teacher calls on the test conversations are the held-out calls): the embedded default's, or
`configs/locomo.yaml`'s on LoCoMo. The training conversations are shuffled once (seeded) and each size trains
on the first k of them, so every larger set holds the smaller ones; every size stops early on the same validation
conversation with the same recipe (`distill_operations`, as `memlora distill` trains). Each size's experts answer
the same held-out calls; per operation the evaluation's agreement metric with a 95 % interval that resamples
conversations (Cohen's kappa next to update's macro-F1), and, on the generation calls, QA token F1 against the
gold answer with the teacher's own memories (categories 1-4) and the share of answers that abstain, each next to
the training rows it took.

--quick: OUT's trace rows are cut into 3 blocks by position (the bundled sample is one conversation); sizes 1
and 2 train on blocks 1 and 1-2 for one epoch and the third block is held out. It keeps the bench working; its
numbers say nothing.
"""

from __future__ import annotations

import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
from common import (  # noqa: E402
    add_training_flags, answers_against_gold, bench_parser, finished_run, interval_text, save, table, triple,
)

from memlora.config import OPERATIONS  # noqa: E402
from memlora.data.io import write_parquet  # noqa: E402
from memlora.data.schemas import TRACES  # noqa: E402
from memlora.evaluation import deferral  # noqa: E402
from memlora.evaluation.agreement import PRIMARY  # noqa: E402
from memlora.evaluation.captured import agreement_rows  # noqa: E402
from memlora.layout import DATASETS, TEMPLATES, calls_path, student_dir, trace_files, traces_dir  # noqa: E402
from memlora.manifest import update_manifest  # noqa: E402
from memlora.student.distill import distill_operations  # noqa: E402
from memlora.student.examples import conversation_splits, load_traces  # noqa: E402
from memlora.student.experts import verified_expert_folders  # noqa: E402
from memlora.student.improve import backend_for  # noqa: E402

QUICK_BLOCKS = 3


class Plan:
    """Which trace rows each size trains on, and the held-out calls every size answers."""

    def __init__(self, out: Path, config, operations: list[str], quick: bool, seed: int):
        self.out, self.operations, self.quick = out, operations, quick
        self._traces: dict[str, list[dict]] = {}
        self.splits = conversation_splits(out)
        if quick:
            self.units = [f"block-{b}" for b in range(QUICK_BLOCKS - 1)]
            self.held = [deferral.held_out_call(row, config) for op in operations
                         for i, row in enumerate(self._rows(op)) if self.unit_of(row, i) == f"block-{QUICK_BLOCKS - 1}"
                         and row["parse_ok"] and row["parsed_output"]]
            return
        if not calls_path(out, "teacher").is_file():
            sys.exit(f"{out}: no evaluation (run `memlora evaluate` on it first: its teacher calls on the test "
                     "conversations are the held-out calls)")
        self.units = sorted(cid for cid, split in self.splits.items() if split == "train")
        random.Random(seed).shuffle(self.units)
        self.held = deferral.test_calls(out, config, operations)

    def _rows(self, operation: str) -> list[dict]:
        """OUT's trace rows of an operation, read once for every size."""
        if operation not in self._traces:
            self._traces[operation] = load_traces(trace_files(self.out, operation)).to_pylist()
        return self._traces[operation]

    def unit_of(self, row: dict, index: int) -> str:
        return f"block-{index % QUICK_BLOCKS}" if self.quick else row["conversation_id"]

    def subset_out(self, folder: Path, units: set[str]) -> Path:
        """An OUT whose traces are the rows of `units` (and the validation conversation's), reading OUT's
        datasets, student and templates through links."""
        for op in self.operations:
            rows = [row for i, row in enumerate(self._rows(op))
                    if self.unit_of(row, i) in units or self.splits.get(row["conversation_id"]) == "validation"]
            shard = traces_dir(folder, op) / "part-subset.parquet"
            if rows and not shard.exists():
                write_parquet(pa.Table.from_pylist(rows, schema=TRACES), shard, "traces")
        for name in (DATASETS, "student", TEMPLATES):
            if (self.out / name).exists() and not (folder / name).exists():
                (folder / name).symlink_to((self.out / name).resolve())
        update_manifest(folder)
        return folder


def measure(plan: Plan, config, size: int, folder: Path) -> list[dict]:
    units = plan.units[:size]
    plan.subset_out(folder, set(units))
    base = student_dir(plan.out)
    records = distill_operations(config, folder, list(plan.operations), base)  # one launch
    backend = backend_for(config, base, verified_expert_folders(folder))
    scored = deferral.score(backend, backend.tokenizer, plan.held, config)
    del backend
    rows = []
    for op in plan.operations:
        pick = [i for i, c in enumerate(plan.held) if c.operation == op]
        calls = [plan.held[i] for i in pick]
        outputs = [deferral.parsed_value(scored[i].text) for i in pick]
        record = records[op]
        row = {"size": size, "units": units, "operation": op, "n": len(pick),
               "training_rows": getattr(record, "train_examples", 0),
               "validation_loss": getattr(record, "validation_loss_best", None)}
        for r in agreement_rows(f"n{size}", op, outputs, calls, config):
            if r["unit"] == "ratio":
                row[r["metric"]] = triple(r)
        if op == "generation":
            answers = [str((output or {}).get("answer", "")) for output in outputs]
            row.update(answers_against_gold(calls, answers, plan.out, config.evaluation.bootstrap_samples))
        rows.append(row)
    return rows


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--sizes", default=None, help="training conversations per arm, e.g. 1,3,6,all")
    parser.add_argument("--operations", default=None)
    add_training_flags(parser, "each size's OUT")
    args = parser.parse_args()
    out, config, work = finished_run(parser, args, "data-scaling-")
    if args.quick:
        config = config.model_copy(update={"distill": config.distill.model_copy(
            update={"max_epochs": 1, "epochs": {}})})
    operations = (args.operations or ("update" if args.quick else ",".join(OPERATIONS))).split(",")
    plan = Plan(out, config, operations, args.quick, args.seed)
    if not plan.held:
        sys.exit(f"{out}: no held-out calls of {', '.join(operations)}")
    wanted = args.sizes or ("1,2" if args.quick else "1,3,6,all")
    sizes = sorted({len(plan.units) if s == "all" else min(int(s), len(plan.units)) for s in wanted.split(",")})
    rows = []
    try:
        for size in sizes:
            rows += measure(plan, config, size, work / f"n{size}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    shown = [{**r, "agreement": interval_text(r.get(PRIMARY[r["operation"]])),
              "kappa": interval_text(r.get("cohen_kappa")),
              "qa_cat1-4": interval_text(r.get("qa_token_f1_expert")), "abstains": r.get("abstains_expert", "")}
             for r in rows]
    print(table(shown, ["operation", "size", "training_rows", "n", "agreement", "kappa", "qa_cat1-4", "abstains",
                        "validation_loss"]))
    for op in operations:
        mine = [r for r in rows if r["operation"] == op and (r.get(PRIMARY[op]) or [None])[0] is not None]
        if len(mine) >= 2 and mine[0][PRIMARY[op]][0]:
            first, last = mine[0], mine[-1]
            print(f"{op}: {PRIMARY[op]} with {last['training_rows']} training rows / with {first['training_rows']}: "
                  f"{last[PRIMARY[op]][0] / first[PRIMARY[op]][0]:.2f}x")
    path = save("data_scaling", {"out": str(out), "units": plan.units, "sizes": sizes, "quick": args.quick,
                                 "held_out_calls": len(plan.held), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
