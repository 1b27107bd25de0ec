"""DeLoRA vs LoRA at equal rank on the student: trainable parameters and training-step time, side by side.

    python bench/expert_step_time.py --config configs/default.yaml --out OUT [--operation update] [--steps 6]

Both experts sit on their own copy of the same student base (OUT/student/base, built if missing) and train on
the same batches of OUT/traces/<operation> with the distillation loss; their steps alternate (DeLoRA, LoRA,
DeLoRA, ...) so that load from other processes hits both alike. Plain torch, one process: this measures the
adapters' own cost, not DeepSpeed's.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from memlora.config import load_config
from memlora.student.build import build_student, shares_teacher_tokenizer
from memlora.student.examples import build_examples, load_traces, trace_files
from memlora.student.experts import attach_expert
from memlora.student.losses import distillation_loss
from memlora.student.trainer import Collator
from memlora.teacher.hf_backend import load_causal_lm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/default.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--operation", default="update")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    config = load_config(args.config)
    cfg, expert = config.distill, config.student.expert
    base = build_student(config, args.out)
    runs = {}
    for method in ("delora", "lora"):
        model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
        torch.manual_seed(cfg.seed)
        model = attach_expert(model, expert.model_copy(update={"method": method}))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        runs[method] = {"model": model, "opt": torch.optim.AdamW(params, lr=cfg.learning_rate),
                        "trainable": sum(p.numel() for p in params), "times": [], "losses": []}
    same_tokenizer = shares_teacher_tokenizer(config, tokenizer)
    data = build_examples(load_traces(trace_files(args.out, args.operation)), tokenizer, cfg.max_length,
                          same_tokenizer)
    top_k = max((len(s) for e in data.examples if e.teacher_ids for s in e.teacher_ids), default=1)
    collator = Collator(tokenizer.pad_token_id, top_k)
    batches = [collator(data.examples[i : i + cfg.batch_size]) for i in range(0, len(data.examples), cfg.batch_size)]

    for step in range(args.steps + 1):  # step 0 warms up both and is not timed
        batch = batches[step % len(batches)]
        for method, run in runs.items():
            started = time.perf_counter()
            logits = run["model"](input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _ = distillation_loss(logits, batch["labels"], batch["teacher_ids"], batch["teacher_logprobs"],
                                        batch["teacher_mask"], cfg.kd_weight, cfg.kd_loss, cfg.jsd_beta)
            loss.backward()
            run["opt"].step()
            run["opt"].zero_grad(set_to_none=True)
            if step:
                run["times"].append(time.perf_counter() - started)
            run["losses"].append(round(loss.item(), 3))

    print(f"operation {args.operation}: {len(data.examples)} rows, batch {cfg.batch_size}, r={expert.r}, "
          f"targets {','.join(expert.target_modules)}, {args.steps} timed steps each, interleaved")
    for method, run in runs.items():
        print(f"{method:<7} trainable {run['trainable']:>9,}  step median {statistics.median(run['times']):.3f} s  "
              f"(min {min(run['times']):.3f})  loss {run['losses'][0]} -> {run['losses'][-1]}")
    ratio = statistics.median(runs["delora"]["times"]) / statistics.median(runs["lora"]["times"])
    print(f"DeLoRA / LoRA step time: {ratio:.2f}x; trainable parameters: "
          f"{runs['delora']['trainable'] / runs['lora']['trainable']:.4f}x")


if __name__ == "__main__":
    main()
