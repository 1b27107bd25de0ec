"""Which int8 design keeps the experts' answers: a pipeline run's trained experts answer the teacher's own calls of the
validation conversation(s) in several designs, one after the other in one process: float32 with the active expert
merged (`merge_experts: true`), float32 with every expert beside the base folded into low-rank pairs (the default),
int8 with the experts float32 beside the base (`student.quantize: int8`, `merge_experts: false`), int8 with one
copy of each adapted layer per expert, merged before quantizing (`merge_experts: true`), the last also with
SmoothQuant's smoothing at each `--smoothing` strength (`student.int8_smoothing`) and at each `--keep-smoothing`
strength with the `--keep` linears left float32 (`student.int8_keep_float32`), weight-only int8 merged
(`student.quantize: int8_weight`) and beside (`merge_experts: false`), int4 beside (`int4_weight`, whose experts
never merge), the weight-only ones also with their KV cache float32 (`-kv32`; they hold it in bfloat16). Per
operation: agreement with the teacher (the operation's primary metric, 95 % interval), the share of answers
identical to float32's, seconds per generated token. Writes bench/results/int8_designs.json.

    python bench/int8_designs.py --out OUT [--quick] [--smoothing 0.7] [--keep-smoothing 0.85]
        [--keep down_proj,lm_head] [--designs float32,int8_weight-merged]

Validation calls only: the design is chosen here, never on the test conversations.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (CONFIG, QUICK_TOKENS, bench_parser, replay_agreement, save, student_with_experts,  # noqa: E402
                    table, validation_rows)

from memlora.config import OPERATIONS, load_config  # noqa: E402

# design -> (quantize, merge_experts, int8_smoothing, int8_keep_float32)
DESIGNS = {"float32": ("none", True, 0.0, ()), "float32-beside": ("none", False, 0.0, ()),
           "int8-beside": ("int8", False, 0.0, ()),
           "int8-merged": ("int8", True, 0.0, ()), "int8_weight-merged": ("int8_weight", True, 0.0, ()),
           "int8_weight-beside": ("int8_weight", False, 0.0, ()),
           "int4_weight-beside": ("int4_weight", False, 0.0, ())}
# The weight-only schemes hold their KV cache in bfloat16 (`llm.kv_cache.store_kv_as`); these keep it float32.
KV_FLOAT32 = {f"{name}-kv32": design for name, design in DESIGNS.items() if design[0] in ("int8_weight", "int4_weight")}


def main() -> int:
    parser = bench_parser(__doc__)
    # The strengths bench/int8_logits.py found best on the validation calls (2026-12-04): 0.7 alone, 0.85 with
    # down_proj and lm_head float32.
    parser.add_argument("--smoothing", default="0.7", help="comma-separated strengths for int8-merged-smooth")
    parser.add_argument("--keep-smoothing", default="0.85", help="comma-separated strengths for the -keep designs")
    parser.add_argument("--keep", default="down_proj,lm_head", help="linears left float32 in the -keep designs")
    parser.add_argument("--designs", default="", help="comma-separated design names to run (default: all; float32, "
                        "the yardstick, always runs)")
    args = parser.parse_args()
    designs, keep = DESIGNS | KV_FLOAT32, tuple(k for k in args.keep.split(",") if k)
    for alpha in [float(a) for a in args.smoothing.split(",") if a]:
        designs[f"int8-merged-smooth{alpha:g}"] = ("int8", True, alpha, ())
    for alpha in [float(a) for a in args.keep_smoothing.split(",") if a and keep]:
        designs[f"int8-merged-smooth{alpha:g}-keep"] = ("int8", True, alpha, keep)
    if args.designs:
        unknown = set(args.designs.split(",")) - set(designs)
        if unknown:
            parser.error(f"--designs: unknown {', '.join(sorted(unknown))} (known: {', '.join(designs)})")
        designs = {name: d for name, d in designs.items() if name == "float32" or name in args.designs.split(",")}
    if args.quick:  # every path once: float32, beside, and the merged design with its options
        designs = {name: designs[name] for name in ("float32", "int8-beside", list(designs)[-1])}
    import tempfile

    config = load_config(CONFIG)
    with tempfile.TemporaryDirectory(prefix="int8-designs-") as scratch:  # a student and experts built without OUT
        return run_designs(args, designs, keep, config, Path(scratch))


def run_designs(args, designs: dict, keep: tuple[str, ...], config, scratch: Path) -> int:
    """Each design in turn on the same calls (`scratch`: where a student and experts are built without OUT)."""
    from memlora.llm.kv_cache import store_kv_as
    from memlora.student.experts import ExpertBackend

    base, experts_out = student_with_experts(args.out, scratch, config)
    limit = 2 if args.quick else (None if args.out else 8)  # OUT's validation calls, all of them
    rows = {op: validation_rows(experts_out, op, limit) for op in OPERATIONS}
    budgets = {op: QUICK_TOKENS if args.quick else config.memory.operations[op].max_new_tokens for op in OPERATIONS}
    results, answers = [], {}
    for design, (quantize, merge, alpha, kept) in designs.items():
        backend = ExpertBackend.from_out(base, experts_out, device="cpu", batch_size=config.teacher.batch_size,
                                         prompt=config.student.prompt, merge=merge, quantize=quantize,
                                         smoothing_alpha=alpha, keep_float32=kept)
        if design in KV_FLOAT32:
            store_kv_as(backend.model, None)
        for op in OPERATIONS:
            if not rows[op]:
                continue
            scored = replay_agreement(op, rows[op], backend, budgets[op])
            ids = scored.pop("token_ids")
            answers[design, op] = ids
            same = sum(a == b for a, b in zip(ids, answers["float32", op])) / len(ids)
            results.append({"design": design, "operation": op, **scored, "same_as_float32": round(same, 3),
                            "s_per_token_vs_float32": None})
            print(f"{design} {op}: agreement {scored['agreement']} {scored['ci']}, same as float32 {same:.2f}",
                  flush=True)
        del backend
        gc.collect()
    for r in results:
        ref = next(x for x in results if x["design"] == "float32" and x["operation"] == r["operation"])
        r["s_per_token_vs_float32"] = f"{r['s_per_token'] / ref['s_per_token']:.2f}x"
        r["s_per_token"] = round(r["s_per_token"], 4)
    print(table(results, ["design", "operation", "agreement", "ci", "parse_ok", "same_as_float32", "s_per_token",
                          "s_per_token_vs_float32", "n"]))
    from memlora.student.examples import conversation_splits

    source = "validation conversations" if conversation_splits(experts_out) else "first trace rows (no split marked)"
    saved = save("int8_designs", {"quick": args.quick, "calls": source, "keep_float32": list(keep), "rows": results})
    print(f"saved {saved}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
