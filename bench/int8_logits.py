"""Where int8 loses the student's answers: the student base reads the teacher's own validation calls with their
recorded answers (teacher-forced, prompt and answer), in float32 and in int8 variants, one after the other in one
process; per variant, the mean logit error as a share of the float32 logits' spread and the share of positions
whose top token is float32's. Variants: every linear int8 (torch's dynamic quantization: int8 weights per
output channel, activations rounded per tensor per call), SmoothQuant smoothing at each `--smoothing` strength
(`student.int8_smoothing`), each strength with the `--keep` linears left float32 (`student.int8_keep_float32`),
weight-only int8 (`int8_weight`: every linear int8, activations multiplied in bfloat16, not rounded) and
weight-only int4 (`int4_weight`: the same with 4-bit weights in groups of 64 inputs).
Also the largest input of each layer's down_proj over its mean (the activation outliers int8 rounds around).
Writes bench/results/int8_logits.json.

    python bench/int8_logits.py --out OUT [--quick] [--smoothing 0.5,0.7,0.85] [--keep down_proj,lm_head]

Validation calls only: the settings are chosen here, never on the test conversations.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CONFIG, bench_parser, bench_student, save, table, traces_root, validation_rows  # noqa: E402

from memlora.config import OPERATIONS, load_config  # noqa: E402
from memlora.llm.quantize import INT4, WEIGHT_ONLY  # noqa: E402  every linear int8 / 4-bit, inputs in bfloat16


def teacher_forced(tokenizer, row: dict, most: int):
    import torch

    messages = row["messages"] if isinstance(row["messages"], list) else json.loads(row["messages"])
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + row["raw_output"]
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:most])[None]


def down_proj_outliers(model, calibration) -> dict[str, float]:
    """Per layer, the largest |input| of down_proj over its mean on `calibration` (float32)."""
    import torch

    ratios: dict[str, float] = {}

    def hook(name):
        def record(_module, args):
            x = args[0].detach().abs()
            ratios[name] = max(ratios.get(name, 0.0), float(x.max() / x.mean()))
        return record

    handles = [m.register_forward_pre_hook(hook(n.split(".")[-3])) for n, m in model.named_modules()
               if n.endswith("mlp.down_proj")]
    with torch.no_grad():
        for ids in calibration:
            model(input_ids=ids[None])
    for handle in handles:
        handle.remove()
    return ratios


def main() -> int:
    parser = bench_parser(__doc__)
    parser.add_argument("--smoothing", default="0.5,0.7,0.85", help="comma-separated smoothing strengths")
    parser.add_argument("--keep", default="down_proj,lm_head", help="linears left float32 in the +keep variants")
    args = parser.parse_args()
    import tempfile

    import torch

    from memlora.llm.hf_backend import load_causal_lm
    from memlora.llm.quantize import quantize_base, smooth_in_place, smoothing
    from memlora.llm.calibration import calibration_ids

    config = load_config(CONFIG)
    with tempfile.TemporaryDirectory(prefix="int8-logits-") as scratch:  # a student built without OUT, once loaded
        model, tokenizer, _ = load_causal_lm(str(bench_student(config, args.out or scratch)), dtype="float32",
                                             device="cpu")
    per_op, most = (1, 256) if args.quick else (3, 1024)
    calls = [r for op in OPERATIONS for r in validation_rows(traces_root(args.out), op, per_op)]
    inputs = [teacher_forced(tokenizer, r, most) for r in calls]
    with torch.no_grad():
        want = [model(input_ids=ids).logits for ids in inputs]
    calibration = calibration_ids(tokenizer)
    alphas = [float(a) for a in args.smoothing.split(",") if a][: 1 if args.quick else None]
    keep = tuple(k for k in args.keep.split(",") if k)
    variants = [("int8", 0.0, ())] + [(f"int8, smoothed {a:g}", a, ()) for a in alphas]
    variants += [(f"int8, smoothed {a:g}, {'+'.join(keep)} float32", a, keep) for a in alphas if keep]
    variants += [(WEIGHT_ONLY, 0.0, ()), (INT4, 0.0, ())]
    rows = []
    for label, alpha, kept in variants:
        variant = copy.deepcopy(model)
        if alpha:
            smooth_in_place(variant, smoothing(variant, calibration, alpha))
        quantize_base(variant, label if label in (WEIGHT_ONLY, INT4) else "int8", kept)
        errors, same = [], []
        with torch.no_grad():
            for ids, reference in zip(inputs, want):
                got = variant(input_ids=ids).logits
                errors.append(float((got - reference).abs().mean() / reference.std()))
                same.append(float((got.argmax(-1) == reference.argmax(-1)).float().mean()))
        rows.append({"variant": label, "logit_error_vs_std": round(sum(errors) / len(errors), 3),
                     "same_top_token": round(sum(same) / len(same), 3), "sequences": len(inputs),
                     "positions": int(sum(ids.shape[1] for ids in inputs))})
        print(f"{label}: logit error {rows[-1]['logit_error_vs_std']}x std, same top token "
              f"{rows[-1]['same_top_token']}", flush=True)
        del variant
    outliers = down_proj_outliers(model, calibration)
    print(table(rows, ["variant", "logit_error_vs_std", "same_top_token", "sequences", "positions"]))
    worst = sorted(outliers.items(), key=lambda kv: -kv[1])[:6]
    print("down_proj input max / mean, worst layers: " + ", ".join(f"layer {k} {v:.0f}x" for k, v in worst))
    print(f"saved {save('int8_logits', {'quick': args.quick, 'rows': rows, 'down_proj_outliers': outliers})}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
