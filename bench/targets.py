"""What an expert learns to write, chosen on the validation split (`distill.targets`). Writes
bench/results/targets_<operation>.json.

    python bench/targets.py --out OUT [--operation generation] [--variants ...] [--on validation|test]
                            [--seeds 0,1,2] [--work DIR]

Variants, generation (default gold,gold_supported,cap0.05,teacher): the gold answers as they come (a fifth of
them "Not mentioned in the conversation"), the gold answers only where the prompt's memories hold them
(`generation: gold_supported`), the gold answers with at most a share X abstaining (`capX`,
`max_abstain_share`), or the teacher's own answers. Update (default balanced,unbalanced): rarer decisions
repeated (`balance_update: true`) or not; `weightN`: OUT's recipe with the event tokens weighted N in the loss
(`event_weight`).

`--seeds` trains each variant once per training seed (`distill.seed`), a row each: an expert trained on ~100 rows
can differ more between seeds than between variants. With `--work`, a second run `--on test` answers the test
calls with the experts the validation run trained (same traces and recipe: nothing is trained again).

OUT is a finished `memlora run`. Each variant trains the operation's expert on OUT's traces with OUT's recipe but
for its targets (the same rows, the same validation conversation), and answers the held-out calls: the
validation conversation's trace rows (`--on validation`, what a setting is chosen on) or the teacher's calls on
the test conversations (`--on test`, to check a choice, never to make it). The prompts hold the teacher's own
memories, so what differs is the expert alone. Per variant: the evaluation's agreement metrics with the teacher
(update: macro-F1, Cohen's kappa, the DELETEs it says and the teacher's, and how sure the expert was of its
events: the median and largest probability of its decision tokens); for generation also QA token F1 against
the gold answer on categories 1-4 with a 95 % interval, the share of those answers that abstain (the teacher's on
the same prompts beside it) and the share of adversarial (category 5) questions it rightly abstains on.
"""

from __future__ import annotations

import math
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    add_training_flags, answers_against_gold, bench_parser, finished_run, interval_text, save, table, triple,
)
from warm_start import linked_out  # noqa: E402

from memlora.evaluation import deferral  # noqa: E402
from memlora.evaluation.captured import agreement_rows  # noqa: E402
from memlora.layout import student_dir, trace_files  # noqa: E402
from memlora.llm.confidence import event_token_indices  # noqa: E402
from memlora.student.build import shares_teacher_tokenizer  # noqa: E402
from memlora.student.distill import distill_operation  # noqa: E402
from memlora.student.examples import load_traces, update_event  # noqa: E402
from memlora.student.experts import verified_expert_folders  # noqa: E402
from memlora.student.improve import backend_for  # noqa: E402

VARIANTS = {"generation": "gold,gold_supported,cap0.05,teacher", "update": "balanced,unbalanced"}


def variant_config(config, operation: str, name: str, seed: int | None = None):
    targets = config.distill.targets
    if operation == "update" and name in ("balanced", "unbalanced"):
        targets = targets.model_copy(update={"balance_update": name == "balanced"})
    elif operation == "update" and name.startswith("weight"):
        targets = targets.model_copy(update={"event_weight": float(name[6:])})
    elif operation == "generation" and name == "teacher":
        targets = targets.model_copy(update={"generation": "teacher", "max_abstain_share": None})
    elif operation == "generation" and name.startswith("cap"):
        targets = targets.model_copy(update={"generation": "gold", "max_abstain_share": float(name[3:])})
    elif operation == "generation" and name in ("gold", "gold_supported"):
        targets = targets.model_copy(update={"generation": name, "max_abstain_share": None})
    else:
        raise SystemExit(f"--variants: unknown {operation} variant {name!r} (have: {VARIANTS.get(operation)})")
    distill = {"targets": targets, **({"seed": seed} if seed is not None else {})}
    return config.model_copy(update={"distill": config.distill.model_copy(update=distill)})


def teacher_event_confidence(out: Path, config) -> dict:
    """How sure the teacher was of each update decision the expert learns: its probability of the first token of
    the event it wrote, from the trace's top-k, over OUT's update rows (every split). Needs the student to share
    the teacher's tokenizer, else {}."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(student_dir(out))
    if not shares_teacher_tokenizer(config, tokenizer):
        return {}
    probs: dict[str, list[float]] = {}
    for row in load_traces(trace_files(out, "update")).to_pylist():
        ids, top = row["completion_token_ids"], row["top_logprobs"]
        if not (row["parse_ok"] and ids and top):
            continue
        at = event_token_indices(tokenizer, list(ids))
        chosen = [t["logprob"] for t in top[at[0]] if t["token_id"] == ids[at[0]]] if at and at[0] < len(top) else []
        if chosen:
            probs.setdefault(update_event(row["raw_output"]) or "?", []).append(math.exp(chosen[0]))
    return {event: {"rows": len(ps), "median": round(statistics.median(ps), 3),
                    "under_0.6": sum(p < 0.6 for p in ps), "over_0.9": sum(p > 0.9 for p in ps)}
            for event, ps in sorted(probs.items())}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--operation", choices=tuple(VARIANTS), default="generation")
    parser.add_argument("--variants", default=None, help="comma-separated (default: the operation's all)")
    parser.add_argument("--on", choices=("validation", "test"), default="validation")
    parser.add_argument("--seeds", default=None, help="comma-separated training seeds (default: --seed)")
    add_training_flags(parser, "each variant's OUT")
    args = parser.parse_args()
    out, config, work = finished_run(parser, args, "targets-")
    op = args.operation
    calls = (deferral.validation_calls(out, config, [op]) if args.on == "validation"
             else deferral.test_calls(out, config, [op]))
    if not calls:
        sys.exit(f"{out}: no {args.on} {op} calls")
    rows = []
    try:
        seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
        for name, seed in [(n, s) for n in (args.variants or VARIANTS[op]).split(",") for s in seeds]:
            cfg = variant_config(config, op, name, seed)
            folder = linked_out(out, work / (f"{name}-seed{seed}" if args.seeds else name), [op], None)
            record = distill_operation(cfg, folder, op, student_dir(out))
            backend = backend_for(cfg, student_dir(out), verified_expert_folders(folder))
            scored = deferral.score(backend, backend.tokenizer, calls, cfg)
            texts = [s.text for s in scored]
            del backend
            outputs = [deferral.parsed_value(t) for t in texts]
            row = {"variant": name, "seed": seed, "training_rows": record.train_examples, "targets": record.targets,
                   "oversampled": record.oversampled, "validation_loss": record.validation_loss_best}
            for r in agreement_rows(name, op, outputs, calls, cfg):
                row[r["metric"]] = (triple(r) if r["unit"] == "ratio"
                                    else int(r["value"]))
            if op == "update":  # the expert's own probability of the event it wrote (its decision tokens')
                own = [math.exp(s.confidence) for s in scored if s.confidence > -math.inf]
                row["own_event_p_median"] = round(statistics.median(own), 3) if own else None
                row["own_event_p_max"] = round(max(own), 3) if own else None
            if op == "generation":
                answers = [str((o or {}).get("answer", "")) for o in outputs]
                row.update(answers_against_gold(calls, answers, out, config.evaluation.bootstrap_samples))
            rows.append(row)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"{len(calls)} {args.on} {op} calls of {out}")
    columns = {"generation": ["qa_n", "qa_cat1-4", "abstains_expert", "abstains_teacher",
                              "adversarial_abstains_expert", "answer_token_f1", "teacher_qa"],
               "update": ["event_macro_f1", "cohen_kappa", "majority_baseline_macro_f1", "predicted_delete",
                          "reference_delete", "own_event_p_median", "own_event_p_max"]}[op]
    shown = [{**r, **{k: interval_text(v) for k, v in r.items() if isinstance(v, list)},
              "qa_cat1-4": interval_text(r.get("qa_token_f1_expert")),
              "teacher_qa": interval_text(r.get("qa_token_f1_teacher"))} for r in rows]
    print(table(shown, ["variant", "seed", "training_rows", *columns, "validation_loss"]))
    confidence = teacher_event_confidence(out, config) if op == "update" else {}
    for event, c in confidence.items():
        print(f"teacher's probability of its own {event}: median {c['median']} over {c['rows']} rows, "
              f"{c['under_0.6']} under 0.6, {c['over_0.9']} over 0.9")
    path = save(f"targets_{op}", {"out": str(out), "operation": op, "on": args.on, "calls": len(calls),
                                  "rows": rows, "teacher_event_confidence": confidence})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
