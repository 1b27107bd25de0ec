"""Expert methods side by side: ETHER, DeLoRA and LoRA experts of one operation at 1x, 4x and 16x each method's
default learning rate, and TRL's SFTTrainer + a peft LoRA config (the peer a user would pick instead). Writes
bench/results/methods.json.

    python bench/methods.py [--quick] [--out OUT] [--operation extraction] [--steps N] [--multipliers 1,4,16]

Every run of ours: the same student base, the same training rows in the same batches, the same seed and number
of optimizer steps, AdamW with the trainer's schedule (linear warmup over distill.warmup_ratio of the steps,
then constant), gradient clipping at 1.0 and the project's distillation loss, in plain torch in this process
(the methods' own behaviour, not DeepSpeed's). Per run: the teacher-forced validation loss, the operation's
held-out agreement (greedy, constrained, on the held-out rows: the evaluation's own metric against the
teacher's output), trainable parameters, median step time and the final relative ||dW||_F over all adapted
layers (and the largest per layer).

TRL: `SFTTrainer` on the same rows as prompt-completion pairs (the student prompt -> the same target text),
with its own chat-template handling and its completion-only cross-entropy (TRL has no loss on stored top-k
log-probs), LoRA of our r, alpha and targets at LoRA's default learning rate, the same steps, batch size and
seed; its validation loss is ours (the same loss on the same rows), computed after training.

Data: OUT's traces split by conversation as the pipeline splits them (train -> training, validation -> held
out); without OUT the bundled sample traces (one conversation), whose last quarter of rows is held out.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from common import CONFIG, QUICK_TOKENS, bench_parser, bench_student, save, table, traces_root  # noqa: E402

from memlora.config import DEFAULT_LEARNING_RATES, load_config  # noqa: E402
from memlora.evaluation import agreement  # noqa: E402
from memlora.evaluation.replay import parse_output  # noqa: E402
from memlora.layout import trace_files  # noqa: E402
from memlora.llm.grammar import GrammarCache  # noqa: E402
from memlora.llm.hf_backend import TransformersBackend, load_causal_lm  # noqa: E402
from memlora.memory.llm import GenerationRequest  # noqa: E402
from memlora.memory.prompts import expert_messages  # noqa: E402
from memlora.student.build import shares_teacher_tokenizer  # noqa: E402
from memlora.student.deviation import weight_deviation  # noqa: E402
from memlora.student.examples import build_examples, conversation_splits, load_traces, split_rows  # noqa: E402
from memlora.student.experts import attach_expert  # noqa: E402
from memlora.student.targets import gold_answers  # noqa: E402
from memlora.student.trainer import Collator, forward_loss, mean_loss  # noqa: E402

METHODS = ("delora", "lora", "ether")


def held_out_split(out: str | None, operation: str) -> tuple[list[dict], list[dict]]:
    table_ = load_traces(trace_files(traces_root(out), operation))
    if out and (Path(out) / "datasets").is_dir():
        train, held = split_rows(table_, conversation_splits(out))
        return train.to_pylist(), held.to_pylist()
    rows = table_.to_pylist()
    cut = len(rows) - max(1, len(rows) // 4)
    return rows[:cut], rows[cut:]


class Data:
    """Training pairs and their text form (for TRL), built row by row so the two stay aligned."""

    def __init__(self, config, tokenizer, rows: list[dict], out: str | None):
        cfg = config.distill
        recipe = dict(prompt=config.student.prompt, targets=cfg.targets, gold=gold_answers(out) if out else {},
                      answer_max_chars=config.memory.answer_max_chars)
        same = shares_teacher_tokenizer(config, tokenizer)
        self.examples, self.pairs = [], []
        for row in rows:
            built = build_examples(pa.Table.from_pylist([row]), tokenizer, cfg.max_length, same, **recipe).examples
            if not built:
                continue  # did not parse, or too long: the trainer skips it too
            example = built[0]
            self.examples.append(example)
            messages = expert_messages(config.student.prompt, row["operation"], row["messages"])
            target = tokenizer.decode(example.input_ids[example.prompt_len:], skip_special_tokens=True)
            self.pairs.append({"prompt": messages, "completion": [{"role": "assistant", "content": target}]})


# The last backend's compiled grammars: the next keeps them where its tokenizer is the same (the backend checks).
_GRAMMARS: dict[str, GrammarCache] = {}


def agreement_on(model, tokenizer, config, operation: str, held: list[dict], max_tokens: int | None) -> dict:
    """The operation's evaluation metric against the teacher, on the held-out rows the teacher's output parsed."""
    model.eval()
    backend = TransformersBackend(model, tokenizer, "bench", batch_size=8, logprobs_top_k=0,
                                  grammars=_GRAMMARS.get("last"))
    _GRAMMARS["last"] = backend.grammars
    budget = config.memory.operations[operation].max_new_tokens
    refs = [r for r in held if r["parse_ok"]]
    requests = [GenerationRequest(operation, expert_messages(config.student.prompt, operation, r["messages"]),
                                  min(budget, max_tokens or budget),
                                  json.loads(r["output_schema"]) if r["output_schema"] else None) for r in refs]
    rows = []
    for i, (ref, result) in enumerate(zip(refs, backend.generate(requests))):
        parsed = parse_output(operation, ref["messages"], result.text)
        rows.append({"operation": operation, "ref_index": i, "parse_ok": parsed.ok,
                     "parsed_output": json.dumps(parsed.value) if parsed.ok else None})
    scores = agreement.score(operation, rows, dict(enumerate(refs)), config.evaluation.fact_match_threshold,
                             samples=1000)
    metric = agreement.PRIMARY[operation]
    estimate = scores[metric]
    finite = lambda v: round(v, 4) if math.isfinite(v) else None  # noqa: E731
    return {"metric": metric, "value": finite(estimate.value), "n": len(rows),
            "ci": [finite(estimate.ci_low), finite(estimate.ci_high)], "parsed": sum(r["parse_ok"] for r in rows)}


def train_ours(config, base: Path, data: Data, method: str, lr: float, steps: int) -> tuple[object, object, dict]:
    cfg = config.distill
    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
    torch.manual_seed(cfg.seed)
    model = attach_expert(model, config.student.expert.model_copy(update={"method": method}), name="default")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    warmup = math.ceil(cfg.warmup_ratio * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    collator = Collator(tokenizer.pad_token_id, top_k(data))
    order = torch.randperm(len(data.examples), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    times, losses = [], []
    for step in range(steps):
        start = (step * cfg.batch_size) % len(order)
        batch = collator([data.examples[i] for i in (order + order)[start : start + cfg.batch_size]])
        started = time.perf_counter()
        loss, _ = forward_loss(model, batch, cfg.kd_weight, cfg.kd_loss, cfg.jsd_beta)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    info = {"trainable": sum(p.numel() for p in params), "step_s": statistics.median(times),
            "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
            "train_loss_finite": all(math.isfinite(v) for v in losses)}
    return model, tokenizer, info


def top_k(data: Data) -> int:
    return max((len(s) for e in data.examples if e.teacher_ids for s in e.teacher_ids), default=1)


def train_trl(config, base: Path, data: Data, steps: int, scratch: Path) -> tuple[object, object, dict]:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    cfg, expert = config.distill, config.student.expert
    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
    tokenizer.padding_side = "right"  # training pads on the right (TRL's collator does too)
    args = SFTConfig(output_dir=str(scratch / "trl"), max_steps=steps, per_device_train_batch_size=cfg.batch_size,
                     learning_rate=DEFAULT_LEARNING_RATES["lora"], lr_scheduler_type="constant_with_warmup",
                     warmup_steps=math.ceil(cfg.warmup_ratio * steps), max_grad_norm=1.0, seed=cfg.seed,
                     logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                     dataloader_num_workers=0, max_length=cfg.max_length, packing=False,
                     # TRL's own defaults are bf16 autocast and gradient checkpointing (trl/trainer/base_config.py).
                     # On a CPU without bfloat16 units a step then took ~2 min against 6-7 s for ours; ours trains
                     # in float32 without checkpointing, so TRL does too here, for a like-for-like comparison.
                     bf16=False, gradient_checkpointing=False)
    peft_config = LoraConfig(r=expert.r, lora_alpha=expert.lora_alpha, target_modules=expert.target_modules,
                             lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(data.pairs),
                         processing_class=tokenizer, peft_config=peft_config)
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    tokenizer.padding_side = "left"
    trained = trainer.model
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    info = {"trainable": sum(p.numel() for p in trained.parameters() if p.requires_grad), "step_s": wall / steps,
            "train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)] if losses else None,
            "train_loss_finite": all(math.isfinite(v) for v in losses), "wall_s": round(wall, 1)}
    return trained, tokenizer, info


def measure(name: str, method: str, multiplier: float, lr: float, trained, config, data: Data, held_data: Data,
            held_rows: list[dict], operation: str, max_tokens: int | None, started: float) -> dict:
    model, tokenizer, info = trained
    cfg = config.distill
    collator = Collator(tokenizer.pad_token_id, max(top_k(data), top_k(held_data)))
    val = mean_loss(model, held_data.examples, collator, cfg, "cpu") if held_data.examples else None
    deviation = weight_deviation(model, "default")
    scored = agreement_on(model, tokenizer, config, operation, held_rows, max_tokens)
    row = {"run": name, "method": method, "lr_x": multiplier, "lr": lr, "val_loss": None if val is None else round(val, 4),
           "agreement": scored, "trainable": info["trainable"], "step_s": round(info["step_s"], 3),
           "dW_rel": deviation["total_relative"], "dW_rel_max_layer": deviation["max_relative"],
           "train_loss_first_last": info["train_loss_first_last"], "train_loss_finite": info["train_loss_finite"],
           "wall_s": round(time.perf_counter() - started, 1)}
    print(f"{name}: val loss {row['val_loss']}, {scored['metric']} {scored['value']} {scored['ci']} "
          f"(n={scored['n']}), dW_rel {row['dW_rel']}, {row['step_s']} s/step", flush=True)
    return row


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--operation", default="extraction")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: one epoch, "
                        "at most 40; --quick: 2)")
    parser.add_argument("--multipliers", default=None, help="learning rates as multiples of each method's "
                        "default (default 1,4,16; --quick: 1)")
    parser.add_argument("--methods", default=",".join(METHODS), help="ours to train (comma-separated; '' for none)")
    parser.add_argument("--no-trl", action="store_true", help="skip the TRL SFTTrainer run")
    args = parser.parse_args()
    multipliers = [float(m) for m in (args.multipliers or ("1" if args.quick else "1,4,16")).split(",")]
    config = load_config(CONFIG)
    cfg = config.distill
    train_rows, held_rows = held_out_split(args.out, args.operation)
    if args.quick:
        train_rows, held_rows = train_rows[:4], held_rows[:2]
    max_tokens = QUICK_TOKENS if args.quick else None
    results = []
    with tempfile.TemporaryDirectory(prefix="memlora-bench-") as scratch:
        base = bench_student(config, args.out or scratch)
        _, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu")
        data, held_data = (Data(config, tokenizer, rows, args.out) for rows in (train_rows, held_rows))
        steps = args.steps or (2 if args.quick else min(40, math.ceil(len(data.examples) / cfg.batch_size)))
        print(f"operation {args.operation}: {len(data.examples)} training rows, {len(held_rows)} held out, "
              f"{steps} steps of batch {cfg.batch_size}, seed {cfg.seed}, student {base}", flush=True)
        header = {"operation": args.operation, "steps": steps, "batch_size": cfg.batch_size,
                  "training_rows": len(data.examples), "held_out_rows": len(held_rows)}
        for method in [m for m in args.methods.split(",") if m]:
            for m in multipliers:
                lr = DEFAULT_LEARNING_RATES[method] * m
                started = time.perf_counter()
                trained = train_ours(config, base, data, method, lr, steps)
                results.append(measure(f"{method} {m:g}x", method, m, lr, trained, config, data, held_data,
                                       held_rows, args.operation, max_tokens, started))
                save("methods", {**header, "complete": False, "runs": results})  # a long run keeps what it has
        if not args.no_trl:
            started = time.perf_counter()
            trained = train_trl(config, base, data, steps, Path(scratch))
            results.append(measure("trl-sft lora 1x", "trl-sft-lora", 1.0, DEFAULT_LEARNING_RATES["lora"], trained,
                                   config, data, held_data, held_rows, args.operation, max_tokens, started))
    rows = [{"run": r["run"], "lr": f"{r['lr']:.0e}", "val_loss": r["val_loss"],
             r["agreement"]["metric"]: f"{r['agreement']['value']} [{r['agreement']['ci'][0]}, "
                                       f"{r['agreement']['ci'][1]}]",
             "parsed": f"{r['agreement']['parsed']}/{r['agreement']['n']}", "trainable": f"{r['trainable']:,}",
             "step_s": r["step_s"], "dW_rel": r["dW_rel"], "wall_s": r["wall_s"]} for r in results]
    print(table(rows, list(rows[0])))
    print("saved", save("methods", {**header, "complete": True, "runs": results}))


if __name__ == "__main__":
    main()
