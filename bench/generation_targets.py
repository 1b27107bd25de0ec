"""What the generation expert learns to write, chosen on the validation split: gold answers as they come (a fifth
of them "Not mentioned in the conversation"), gold answers only where the prompt's memories hold
them (`distill.targets.generation: gold_supported`), gold answers with the abstaining share capped
(`distill.targets.max_abstain_share`), or the teacher's own answers. Writes bench/results/generation_targets.json.

    python bench/generation_targets.py --out OUT [--variants gold,gold_supported,cap0.05,teacher] [--on validation|test]

OUT is a finished `memlora run`. Each variant trains a generation expert on OUT's traces with OUT's recipe but
for its targets (the same rows, steps and validation conversation), and answers the held-out generation calls:
the validation conversation's trace rows (`--on validation`, what a setting is chosen on) or the teacher's calls
on the test conversations (`--on test`, to check a choice, never to make it). The prompts hold the teacher's own
memories, so what differs is the expert alone. Per variant: QA token F1 against the gold answer on categories
1-4 with a 95 % interval, the share of those answers that abstain (the teacher's on the same prompts beside
it), the share of adversarial (category 5) questions it rightly abstains on, and its answer token F1 against the
teacher's.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import add_training_flags, answers_against_gold, bench_parser, finished_run, save, table  # noqa: E402
from warm_start import linked_out  # noqa: E402

from memlora.evaluation import deferral  # noqa: E402
from memlora.evaluation.captured import agreement_rows  # noqa: E402
from memlora.layout import student_dir  # noqa: E402
from memlora.student.distill import distill_operation  # noqa: E402
from memlora.student.experts import verified_expert_folders  # noqa: E402
from memlora.student.improve import backend_for  # noqa: E402

OP = "generation"


def variant_config(config, name: str):
    """`gold`, `gold_supported`, `teacher`, or `capX` (gold with at most a share X of abstaining targets)."""
    targets = config.distill.targets
    if name == "teacher":
        targets = targets.model_copy(update={"generation": "teacher", "max_abstain_share": None})
    elif name.startswith("cap"):
        targets = targets.model_copy(update={"generation": "gold", "max_abstain_share": float(name[3:])})
    elif name in ("gold", "gold_supported"):
        targets = targets.model_copy(update={"generation": name, "max_abstain_share": None})
    else:
        raise SystemExit(f"--variants: unknown variant {name!r} (gold, teacher, capX)")
    return config.model_copy(update={"distill": config.distill.model_copy(update={"targets": targets})})


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--variants", default="gold,gold_supported,cap0.05,teacher")
    parser.add_argument("--on", choices=("validation", "test"), default="validation")
    add_training_flags(parser, "each variant's OUT")
    args = parser.parse_args()
    out, config, work = finished_run(parser, args, "generation-targets-")
    calls = (deferral.validation_calls(out, config, [OP]) if args.on == "validation"
             else deferral.test_calls(out, config, [OP]))
    if not calls:
        sys.exit(f"{out}: no {args.on} generation calls")
    rows = []
    try:
        for name in args.variants.split(","):
            cfg = variant_config(config, name)
            folder = linked_out(out, work / name, [OP], None)
            record = distill_operation(cfg, folder, OP, student_dir(out))
            backend = backend_for(cfg, student_dir(out), verified_expert_folders(folder))
            texts = [s.text for s in deferral.score(backend, backend.tokenizer, calls, cfg)]
            del backend
            outputs = [deferral.parsed_value(t) for t in texts]
            answers = [str((o or {}).get("answer", "")) for o in outputs]
            agreement = agreement_rows(name, OP, outputs, calls, cfg)[0]
            rows.append({"variant": name, "training_rows": record.train_examples,
                         "targets": record.targets, "validation_loss": record.validation_loss_best,
                         "answer_token_f1_vs_teacher": round(agreement["value"], 3),
                         **answers_against_gold(calls, answers, out, config.evaluation.bootstrap_samples)})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    fmt = lambda v: "–" if not v or v[0] is None else f"{v[0]} [{v[1]}, {v[2]}]"  # noqa: E731
    print(f"{len(calls)} {args.on} generation calls of {out}")
    print(table([{**r, "qa_cat1-4": fmt(r.get("qa_token_f1_expert")), "teacher_qa": fmt(r.get("qa_token_f1_teacher"))}
                 for r in rows],
                ["variant", "training_rows", "qa_n", "qa_cat1-4", "abstains_expert", "abstains_teacher",
                 "adversarial_abstains_expert", "answer_token_f1_vs_teacher", "teacher_qa", "validation_loss"]))
    path = save("generation_targets", {"out": str(out), "on": args.on, "calls": len(calls), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
