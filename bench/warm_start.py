"""Warm against cold start for `improve`'s candidates (`improve.warm_start`), measured on the held-out calls the
promotion gate compares on. Writes bench/results/warm_start.json.

    python bench/warm_start.py --out OUT [--operations extraction,update,generation] [--new-share 0.5]

OUT is a finished `memlora run` (traces, datasets with a validation split, the student, and an evaluation whose
teacher calls on the test conversations are the held-out calls). Its training conversations are cut in two, as
the nightly loop sees them: the "old" ones, on which the current experts are trained from zero, and the "new"
ones that arrive after. Candidates then train on every row, old and new, as `improve` trains them: warm (from the
current expert) or cold (from zero; OUT's own experts when their recipe and traces match, since that is what
they are); and a third arm, warm on the new conversations' rows alone: what a nightly candidate would cost if
it learnt only the day's calls (its training time stays flat as traffic accumulates; DeLoRA's bounded update is
the thesis's argument that it does not forget the old ones). Each arm answers the same held-out calls; agreement
with the teacher, each candidate minus cold with a 95 % interval over conversations (the gate's paired
bootstrap), the share of validation calls kept at the deferral budget, and training time, side by side.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_training_flags, bench_parser, finished_run, save, table  # noqa: E402

from memlora.config import OPERATIONS  # noqa: E402
from memlora.evaluation import deferral  # noqa: E402
from memlora.evaluation.gate import keep_share, paired_difference  # noqa: E402
from memlora.layout import DATASETS, TEMPLATES, adapter_dir, student_dir, trace_files, traces_dir  # noqa: E402
from memlora.manifest import update_manifest  # noqa: E402
from memlora.student.distill import cache_key, distill_operations, finished_record  # noqa: E402
from memlora.student.examples import conversation_splits  # noqa: E402
from memlora.student.experts import verified_expert_folders  # noqa: E402
from memlora.student.improve import backend_for  # noqa: E402

ARMS = ("current", "warm", "cold", "warm_new")


def old_conversations(out: Path, new_share: float, seed: int) -> tuple[list[str], list[str]]:
    """(old, new) training conversations: a seeded cut, the same on every run."""
    train = sorted(cid for cid, split in conversation_splits(out).items() if split == "train")
    random.Random(seed).shuffle(train)
    keep = max(1, round(len(train) * (1 - new_share)))
    return sorted(train[:keep]), sorted(train[keep:])


def linked_out(out: Path, folder: Path, operations: list[str], conversations: set[str] | None) -> Path:
    """An OUT reading `out`'s trace shards (those of `conversations` and the validation ones, or all), datasets
    and student through links, with adapters of its own."""
    splits = conversation_splits(out)
    for op in operations:
        traces_dir(folder, op).mkdir(parents=True, exist_ok=True)
        for shard in trace_files(out, op):
            cid = shard.stem.removeprefix("part-")
            if conversations is None or cid in conversations or splits.get(cid) == "validation":
                target = traces_dir(folder, op) / shard.name
                if not target.exists():
                    os.symlink(shard.resolve(), target)
    for name in (DATASETS, "student", TEMPLATES):
        if (out / name).exists() and not (folder / name).exists():
            os.symlink((out / name).resolve(), folder / name)
    return folder


def reuse_if_same(config, out: Path, folder: Path, operation: str) -> bool:
    """OUT's expert, copied in when it was trained from zero on the same traces with the same recipe (its
    training time is then OUT's run's, not measured beside the warm arm's)."""
    record = finished_record(config, out, operation)
    if record is None or record.cache_key != cache_key(config, folder, operation)["key"]:
        return False
    if not adapter_dir(folder, operation).exists():
        shutil.copytree(adapter_dir(out, operation), adapter_dir(folder, operation))
        update_manifest(folder)
    return True


def train_arms(config, out: Path, work: Path, operations: list[str], old: list[str],
               new: list[str]) -> dict[str, dict]:
    base = student_dir(out)
    current = linked_out(out, work / "current", operations, set(old))
    warm = linked_out(out, work / "warm", operations, None)
    cold = linked_out(out, work / "cold", operations, None)
    warm_new = linked_out(out, work / "warm-new", operations, set(new))
    records = {"current": distill_operations(config, current, list(operations), base)}  # one launch per arm
    init = {op: adapter_dir(current, op) for op in operations}
    records["warm"] = distill_operations(config, warm, list(operations), base, init=init)
    records["warm_new"] = distill_operations(config, warm_new, list(operations), base, init=init)
    reused = {op: reuse_if_same(config, out, cold, op) for op in operations}  # before the cold arm trains
    records["cold"] = distill_operations(config, cold, list(operations), base)
    return {"folders": {"current": current, "warm": warm, "cold": cold, "warm_new": warm_new}, "records": records,
            "reused": reused}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--operations", default=",".join(OPERATIONS))
    parser.add_argument("--new-share", type=float, default=0.5, help="share of training conversations that are new")
    add_training_flags(parser, "the three arms' OUTs")
    args = parser.parse_args()
    out, config, work = finished_run(parser, args, "warm-start-")
    operations = args.operations.split(",")
    old, new = old_conversations(out, args.new_share, args.seed)
    try:
        arms = train_arms(config, out, work, operations, old, new)
        tests = deferral.test_calls(out, config, operations)
        held = deferral.validation_calls(out, config, operations)
        if not tests:
            sys.exit(f"{out}: no held-out calls (run `memlora evaluate` on this OUT first)")
        scored = {}
        for arm, folder in arms["folders"].items():
            backend = backend_for(config, student_dir(out), verified_expert_folders(folder))
            scored[arm] = (deferral.score(backend, backend.tokenizer, tests, config),
                           deferral.score(backend, backend.tokenizer, held, config))
            del backend
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    rows = []
    for op in operations:
        pick = [i for i, c in enumerate(tests) if c.operation == op]
        clusters = [tests[i].conversation_id for i in pick]
        agree = {arm: [scored[arm][0][i].agrees for i in pick] for arm in ARMS}
        diff, low, high = paired_difference(agree["cold"], agree["warm"], clusters, config.improve.samples,
                                            min_clusters=config.improve.min_clusters)
        new_diff, new_low, new_high = paired_difference(agree["cold"], agree["warm_new"], clusters,
                                                        config.improve.samples,
                                                        min_clusters=config.improve.min_clusters)
        row = {"operation": op, "n": len(pick), "conversations": len(set(clusters)),
               "difference_warm_minus_cold": round(diff, 3), "ci": [round(low, 3), round(high, 3)],
               "difference_warm_new_minus_cold": round(new_diff, 3),
               "warm_new_ci": [round(new_low, 3), round(new_high, 3)]}
        for arm in ARMS:
            record = arms["records"][arm][op]
            row[f"{arm}_agreement"] = round(sum(agree[arm]) / len(pick), 3) if pick else None
            row[f"{arm}_keep"] = round(keep_share([s for s in scored[arm][1] if s.operation == op],
                                                  config.deferral.budget), 3)
            row[f"{arm}_train_s"] = getattr(record, "train_time_s", None)
            row[f"{arm}_steps"] = getattr(record, "steps", None)
            row[f"{arm}_validation_loss"] = getattr(record, "validation_loss_best", None)
        row["cold_from_out"] = arms["reused"][op]  # the cold arm is OUT's own expert: its time is that run's
        for arm in ("warm", "warm_new"):
            row[f"{arm}_over_cold_train_time"] = (round(row[f"{arm}_train_s"] / row["cold_train_s"], 2)
                                                  if row[f"{arm}_train_s"] and row["cold_train_s"] else None)
        rows.append(row)
    print(f"old conversations {old} (current experts), new {new}; candidates train on both (warm_new: on the new "
          "ones alone)")
    print(table([{**r, "ci": f"[{r['ci'][0]}, {r['ci'][1]}]",
                  "warm_new_ci": f"[{r['warm_new_ci'][0]}, {r['warm_new_ci'][1]}]"} for r in rows],
                ["operation", "n", "current_agreement", "cold_agreement", "warm_agreement",
                 "difference_warm_minus_cold", "ci", "warm_new_agreement", "difference_warm_new_minus_cold",
                 "warm_new_ci", "cold_keep", "warm_keep", "warm_new_keep", "warm_over_cold_train_time",
                 "warm_new_over_cold_train_time"]))
    for r in rows:
        when = " (cold: OUT's own run, not side by side)" if r["cold_from_out"] else ""
        print(f"{r['operation']}: warm {r['warm_steps']} steps vs cold {r['cold_steps']}, training time "
              f"{r['warm_over_cold_train_time']}x{when}; agreement warm {r['warm_agreement']} vs cold "
              f"{r['cold_agreement']} (n={r['n']}, {r['conversations']} conversations); warm on the new rows alone "
              f"{r['warm_new_steps']} steps, {r['warm_new_over_cold_train_time']}x, "
              f"agreement {r['warm_new_agreement']}")
    path = save("warm_start", {"out": str(out), "old": old, "new": new, "budget": config.deferral.budget,
                               "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
