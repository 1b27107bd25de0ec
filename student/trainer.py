"""Train one expert with the `transformers` Trainer under DeepSpeed; runs inside every rank.

The Trainer brings DeepSpeed integration (ZeRO stages, "auto" values, gradient accumulation, checkpoint-free
saving on rank 0) that TRL's trainers would only wrap again; the one thing we add is the loss.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from memlora.config import Config
from memlora.student.build import shares_teacher_tokenizer
from memlora.student.examples import IGNORE, Example, ExampleSet, build_examples, load_traces, trace_files
from memlora.student.experts import adapter_dir, attach_expert
from memlora.student.losses import distillation_loss
from memlora.teacher.hf_backend import load_causal_lm


def deepspeed_config(stage: int, on_gpu: bool) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": "auto", "allgather_bucket_size": 50_000_000}
    if stage == 3:
        # Without the gather, ZeRO-3 saves empty adapter tensors (seen upstream with peft adapters).
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold="auto",
                    stage3_prefetch_bucket_size="auto")
    return {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "train_batch_size": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": zero,
        "bf16": {"enabled": "auto"},  # from TrainingArguments.bf16: on with a GPU, off on CPU
        "fp16": {"enabled": False},
        # No `optimizer` block: the Trainer builds torch's AdamW; DeepSpeed's own would JIT-compile on CPU.
        "zero_force_ds_cpu_optimizer": False,
        "wall_clock_breakdown": False,
    }


class ExampleDataset(Dataset):
    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]


class Collator:
    """Right-pads a batch; teacher top-k tensors are aligned with `labels` (B, T, K)."""

    def __init__(self, pad_id: int, top_k: int):
        self.pad_id, self.top_k = pad_id, max(top_k, 1)

    def __call__(self, batch: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        n = len(batch)
        out = {
            "input_ids": torch.full((n, width), self.pad_id, dtype=torch.long),
            "attention_mask": torch.zeros((n, width), dtype=torch.long),
            "labels": torch.full((n, width), IGNORE, dtype=torch.long),
            "teacher_ids": torch.zeros((n, width, self.top_k), dtype=torch.long),
            "teacher_logprobs": torch.full((n, width, self.top_k), float("-inf"), dtype=torch.float32),
            "teacher_mask": torch.zeros((n, width), dtype=torch.bool),
        }
        for i, e in enumerate(batch):
            length = len(e.input_ids)
            out["input_ids"][i, :length] = torch.tensor(e.input_ids)
            out["attention_mask"][i, :length] = 1
            out["labels"][i, :length] = torch.tensor(e.labels)
            if e.teacher_ids:
                start = e.prompt_len  # teacher step j is the completion token at prompt_len + j
                for j, (ids, lps) in enumerate(zip(e.teacher_ids, e.teacher_logprobs)):
                    k = min(self.top_k, len(ids))
                    if k == 0:
                        continue
                    out["teacher_ids"][i, start + j, :k] = torch.tensor(ids[:k])
                    out["teacher_logprobs"][i, start + j, :k] = torch.tensor(lps[:k])
                    out["teacher_mask"][i, start + j] = True
        return out


class DistillTrainer(Trainer):
    def __init__(self, *args, kd_weight: float, kd_loss: str, jsd_beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_weight, self.kd_loss, self.jsd_beta = kd_weight, kd_loss, jsd_beta
        self.tokens_seen = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        teacher = {k: inputs.pop(k) for k in ("teacher_ids", "teacher_logprobs", "teacher_mask")}
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        loss, parts = distillation_loss(outputs.logits, labels, teacher["teacher_ids"], teacher["teacher_logprobs"],
                                        teacher["teacher_mask"], self.kd_weight, self.kd_loss, self.jsd_beta)
        if model.training:
            self.tokens_seen += int((labels != IGNORE).sum())
        return (loss, outputs) if return_outputs else loss


@torch.no_grad()
def mean_loss(model, examples: list[Example], collator: Collator, cfg, device) -> float:
    """Distillation loss over a fixed subset, in eval mode: the before/after number in training.json."""
    was_training = model.training
    model.eval()
    total = 0.0
    batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    for batch in batches:
        inputs = {k: v.to(device) for k, v in collator(batch).items()}
        logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss, _ = distillation_loss(logits, inputs["labels"], inputs["teacher_ids"], inputs["teacher_logprobs"],
                                    inputs["teacher_mask"], cfg.kd_weight, cfg.kd_loss, cfg.jsd_beta)
        total += float(loss)
    model.train(was_training)
    return total / max(len(batches), 1)


def train_expert(config: Config, out: str | Path, operation: str, base: str | Path, cache: dict) -> dict | None:
    """Train `operation`'s expert; rank 0 writes OUT/adapters/<operation>/ atomically and returns its record.

    `cache`: {"key", "traces_sha256", "config_fingerprint"}, recorded so a rerun can tell the expert is done."""
    cfg = config.distill
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    started = time.perf_counter()

    # fp32 master weights everywhere; on a GPU, DeepSpeed runs bf16 on top of them.
    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu",
                                         trust_remote_code=config.student.trust_remote_code)
    same_tokenizer = shares_teacher_tokenizer(config, tokenizer)
    files = trace_files(out, operation)
    data: ExampleSet = build_examples(load_traces(files), tokenizer, cfg.max_length, same_tokenizer)
    if not data.examples:
        raise RuntimeError(f"{operation}: no usable trace rows under {Path(out) / 'traces' / operation} "
                           f"({data.rows_total} rows, skipped {data.skipped})")
    top_k = max((len(step) for e in data.examples if e.teacher_ids for step in e.teacher_ids), default=1)
    collator = Collator(tokenizer.pad_token_id, top_k)
    probe = data.examples[: 4 * cfg.batch_size]

    work = Path(out) / "adapters" / f".work-{operation}"
    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        max_steps=cfg.max_steps,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=min(5, cfg.max_steps // 10),
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        remove_unused_columns=False,
        seed=cfg.seed,
        bf16=on_gpu,
        max_grad_norm=1.0,
        deepspeed=deepspeed_config(cfg.zero_stage, on_gpu),
        # On DeepSpeed's CPU accelerator, use_cpu is what makes accelerate set up the gloo process group, so
        # the Trainer sees every rank (world size, sharded batches) instead of one.
        use_cpu=not on_gpu,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    torch.manual_seed(cfg.seed)  # the same expert init on every rank
    model = attach_expert(model, config.student.expert, name="default").to(args.device)
    loss_before = mean_loss(model, probe, collator, cfg, args.device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=ExampleDataset(data.examples), data_collator=collator,
        kd_weight=cfg.kd_weight, kd_loss=cfg.kd_loss, jsd_beta=cfg.jsd_beta,
    )
    train_metrics = trainer.train().metrics
    loss_after = mean_loss(trainer.model_wrapped, probe, collator, cfg, trainer.args.device)
    tokens = torch.tensor([trainer.tokens_seen], dtype=torch.long)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tokens = tokens.to(trainer.args.device)
        torch.distributed.all_reduce(tokens)

    final = adapter_dir(out, operation)
    staging = final.parent / f".staging-{operation}"
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(staging))  # collective under ZeRO-3; only rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if rank != 0:
        return None
    for leftover in ("training_args.bin", "README.md"):
        (staging / leftover).unlink(missing_ok=True)  # a pickle and a template card: not part of an adapter
    curve = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]
    record = {
        "operation": operation,
        "method": config.student.expert.method,
        "steps": trainer.state.global_step,
        "loss_curve": curve,
        "loss_before": round(loss_before, 5),
        "loss_after": round(loss_after, 5),
        "tokens_seen": int(tokens.item()),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(train_metrics["train_runtime"], 2),
        "step_time_s": round(train_metrics["train_runtime"] / max(trainer.state.global_step, 1), 3),
        "world_size": world,
        "global_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world,
        "deepspeed_stage": cfg.zero_stage,
        "device": "cuda" if on_gpu else "cpu",
        "rows_total": data.rows_total,
        "rows_used": data.rows_used,
        "rows_skipped": data.skipped,
        "rows_with_teacher_logprobs": data.with_logprobs,
        "shares_teacher_tokenizer": same_tokenizer,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trace_files": [f.name for f in files],
        "cache_key": cache["key"],
        "traces_sha256": cache["traces_sha256"],
        "config_fingerprint": cache["config_fingerprint"],
        "base": str(base),
    }
    (staging / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    # Swap in with renames only: readers see the old complete expert or the new one, never a partial folder.
    old = final.parent / f".old-{operation}"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return record
