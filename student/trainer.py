"""Train one expert with the `transformers` Trainer under DeepSpeed; runs inside every rank.

The Trainer brings DeepSpeed integration (ZeRO stages, "auto" values, gradient accumulation, checkpoint-free
saving on rank 0) that TRL's trainers would only wrap again; the one thing we add is the loss.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from memlora.config import Config
from memlora.cpu import has_bf16_units
from memlora.data.io import swap_in
from memlora.data.compaction import rows_not_from, shard_names
from memlora.layout import adapter_dir, adapter_work_dir, trace_files
from memlora.llm.hf_backend import load_causal_lm
from memlora.student.build import shares_teacher_tokenizer
from memlora.student.deviation import weight_deviation
from memlora.student.examples import (
    IGNORE, Example, ExampleSet, build_examples, cap_abstaining, conversation_splits, load_traces, oversample_minority,
    split_conversations, split_rows,
)
from memlora.student.experts import TEMPLATE_FILE, attach_expert, resume_expert
from memlora.student.export import portable_base
from memlora.student.losses import completion_window, distillation_loss
from memlora.student.records import TRAINING_FILE, TrainingRecord
from memlora.student.targets import gold_answers
from memlora.student.templates import template_for


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
    """Right-pads a batch; teacher top-k tensors are aligned with `labels` (B, T, K). With an `event_weight`
    other than 1, `loss_weights` (B, T) weighs each example's decision tokens by it and every other token by 1."""

    def __init__(self, pad_id: int, top_k: int, event_weight: float = 1.0):
        self.pad_id, self.top_k, self.event_weight = pad_id, max(top_k, 1), event_weight

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
        if self.event_weight != 1.0:
            out["loss_weights"] = torch.ones((n, width), dtype=torch.float32)
            for i, e in enumerate(batch):
                for j in e.decision or ():
                    out["loss_weights"][i, e.prompt_len + j] = self.event_weight
        return out


class LengthBucketSampler(torch.utils.data.Sampler):
    """Batches of similar lengths, still shuffled every epoch: a CPU step costs what its padded tokens cost, and
    random batches of 4 pad the embedded default's rows to 1.07-1.23x their tokens, these to 1.02-1.04x.

    Each epoch: shuffle, sort each run of `chunk` batches' rows by length, cut it into batches, shuffle the
    batches (a short one last, so the loader's batches line up with these)."""

    def __init__(self, lengths: list[int], batch_size: int, chunk: int = 8, seed: int = 0):
        self.lengths, self.batch_size, self.chunk, self.seed, self.epoch = lengths, batch_size, chunk, seed, 0

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=gen).tolist()
        run = self.batch_size * self.chunk
        batches = []
        for start in range(0, len(order), run):
            rows = sorted(order[start : start + run], key=self.lengths.__getitem__)
            batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        full = [b for b in batches if len(b) == self.batch_size]
        short = [b for b in batches if len(b) < self.batch_size]
        shuffled = [full[i] for i in torch.randperm(len(full), generator=gen).tolist()] + short
        return iter([i for batch in shuffled for i in batch])


def cpu_autocast(cfg, on_gpu: bool) -> bool:
    """Whether the training steps multiply in bfloat16 on this CPU (distill.cpu_precision)."""
    if on_gpu or cfg.cpu_precision == "float32":
        return False
    return cfg.cpu_precision == "bfloat16" or has_bf16_units()


class DistillTrainer(Trainer):
    def __init__(self, *args, kd_weight: float, kd_loss: str, jsd_beta: float, cpu_bf16: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.kd_weight, self.kd_loss, self.jsd_beta = kd_weight, kd_loss, jsd_beta
        self.cpu_bf16 = cpu_bf16
        self.tokens_seen = 0

    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        return LengthBucketSampler([len(e.input_ids) for e in dataset.examples], self.args.train_batch_size,
                                   seed=self.args.seed)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = forward_loss(model, inputs, self.kd_weight, self.kd_loss, self.jsd_beta,
                                     cpu_bf16=self.cpu_bf16)
        if model.training:
            self.tokens_seen += int((inputs["labels"] != IGNORE).sum())
        return (loss, outputs) if return_outputs else loss


def forward_loss(model, inputs: dict[str, torch.Tensor], kd_weight: float, kd_loss: str, jsd_beta: float,
                 cpu_bf16: bool = False):
    """The distillation loss of one collated batch, with logits only where the loss reads them; `cpu_bf16`:
    the model's products in bfloat16 (autocast), the loss from its logits in float32."""
    keep = completion_window(inputs["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16):
        outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], logits_to_keep=keep)
    tail = {k: inputs[k][:, -keep:] for k in ("labels", "teacher_ids", "teacher_logprobs", "teacher_mask")}
    weights = inputs["loss_weights"][:, -keep:] if "loss_weights" in inputs else None
    loss, _ = distillation_loss(outputs.logits.float(), tail["labels"], tail["teacher_ids"], tail["teacher_logprobs"],
                                tail["teacher_mask"], kd_weight, kd_loss, jsd_beta, weights)
    return loss, outputs


@torch.no_grad()
def mean_loss(model, examples: list[Example], collator: Collator, cfg, device, cpu_bf16: bool = False) -> float:
    """Distillation loss over a fixed subset, in eval mode and the training steps' precision: the before/after
    and validation numbers in training.json."""
    was_training = model.training
    model.eval()
    total = 0.0
    batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    for batch in batches:
        inputs = {k: v.to(device) for k, v in collator(batch).items()}
        loss, _ = forward_loss(model, inputs, cfg.kd_weight, cfg.kd_loss, cfg.jsd_beta, cpu_bf16)
        total += float(loss)
    model.train(was_training)
    return total / max(len(batches), 1)


class BestEpoch(TrainerCallback):
    """Validation loss after every epoch; keeps a copy of the best epoch's adapter weights and stops once
    `patience` epochs have not beaten it. Without validation rows every epoch counts as the best (the last
    one is kept) and nothing stops early."""

    def __init__(self, trainer_ref, validation: list[Example], collator: Collator, cfg, zero_stage: int,
                 cpu_bf16: bool = False):
        self.trainer_ref, self.validation, self.collator, self.cfg = trainer_ref, validation, collator, cfg
        self.zero_stage, self.cpu_bf16 = zero_stage, cpu_bf16
        self.epochs: list[dict] = []
        self.best_loss = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self.stopped_early = False
        self._logged = 0

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.trainer_ref().model.named_parameters() if p.requires_grad]

    def _gathered(self, params):
        if self.zero_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(params, modifier_rank=0)
        from contextlib import nullcontext

        return nullcontext()

    def on_epoch_end(self, args, state, control, **kwargs):
        trainer = self.trainer_ref()
        history = [h["loss"] for h in state.log_history if "loss" in h]
        epoch_losses, self._logged = history[self._logged:], len(history)
        train_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else None
        val = mean_loss(trainer.model_wrapped, self.validation, self.collator, self.cfg, args.device,
                        self.cpu_bf16) if self.validation else None
        epoch = len(self.epochs) + 1
        self.epochs.append({"epoch": epoch, "step": state.global_step,
                            "train_loss": round(train_loss, 5) if train_loss is not None else None,
                            "validation_loss": round(val, 5) if val is not None else None,
                            "weight_deviation": self.deviation()})
        if val is None or val < self.best_loss:
            self.best_loss = val if val is not None else math.inf
            self.best_epoch, self.bad_epochs = epoch, 0
            params = [p for _, p in self._trainable()]
            with self._gathered(params):
                self.best_state = {n: p.detach().clone() for n, p in self._trainable()}
        else:
            self.bad_epochs += 1
            if self.cfg.patience and self.bad_epochs >= self.cfg.patience:
                self.stopped_early = True
                control.should_training_stop = True
        return control

    def deviation(self) -> dict:
        """||W_adapted - W||_F of every adapted layer now (student.deviation), gathered first under ZeRO-3."""
        model = self.trainer_ref().model
        with self._gathered(list(model.parameters())):
            return weight_deviation(model, "default")

    def restore_best(self) -> bool:
        """Put the best epoch's weights back; True if that changed anything (the last epoch was not it)."""
        if self.best_state is None or self.best_epoch == len(self.epochs):
            return False
        params = [p for _, p in self._trainable()]
        with self._gathered(params), torch.no_grad():
            for name, p in self._trainable():
                p.copy_(self.best_state[name].to(p.device, p.dtype))
        return True


def planned_steps(n_examples: int, cfg, world: int, epochs: int) -> int:
    per_epoch = math.ceil(math.ceil(n_examples / (cfg.batch_size * world)) / cfg.gradient_accumulation_steps)
    total = max(per_epoch, 1) * epochs
    return min(total, cfg.max_steps) if cfg.max_steps else total


def rows_to_train(config: Config, files: list[Path], splits: dict[str, str], init: str | Path | None):
    """(train rows, validation rows, shards left out as learnt). With `improve.train_on: new`, a candidate that
    starts from a served expert trains only on the rows of shards that expert's record does not list (it learnt
    the others, or its lineage did); validation keeps every validation row, for a like-for-like early stop."""
    train_rows, val_rows = split_rows(load_traces(files), splits)
    record = Path(init) / TRAINING_FILE if init else None
    if config.improve.train_on != "new" or record is None or not record.is_file():
        return train_rows, val_rows, 0
    learnt = set(TrainingRecord.read(record).trace_files)
    if not learnt:  # an expert recorded before shards were: it cannot say what it learnt
        return train_rows, val_rows, 0
    new_train, _ = split_rows(rows_not_from(files, learnt), splits)
    if not new_train.num_rows:  # the night's calls all went to validation or test: nothing new to learn from
        return train_rows, val_rows, 0
    return new_train, val_rows, len(learnt)


def train_expert(config: Config, out: str | Path, operation: str, base: str | Path,
                 cache: dict, init: str | None = None) -> TrainingRecord | None:
    """Train `operation`'s expert (from the adapter folder `init`, else a fresh one); rank 0 writes
    OUT/adapters/<operation>/ atomically and returns its record.

    `cache`: {"key", "traces_sha256", "config_fingerprint", "init_sha256"}, recorded so a rerun can tell the expert
    is done."""
    cfg = config.distill
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    cpu_bf16 = cpu_autocast(cfg, on_gpu)
    started = time.perf_counter()

    # fp32 master weights everywhere; on a GPU, DeepSpeed runs bf16 on top of them.
    model, tokenizer, _ = load_causal_lm(str(base), dtype="float32", device="cpu",
                                         trust_remote_code=config.student.trust_remote_code)
    same_tokenizer = shares_teacher_tokenizer(config, tokenizer)
    files, splits = trace_files(out, operation), conversation_splits(out)
    train_rows, val_rows, learnt = rows_to_train(config, files, splits, init)
    train_conversations, validation_conversations = split_conversations(load_traces(files), splits)
    template = template_for(config, out, operation)
    recipe = dict(prompt=config.student.prompt, targets=cfg.targets, gold=gold_answers(out),
                  answer_max_chars=config.memory.answer_max_chars, template=template)
    data: ExampleSet = build_examples(train_rows, tokenizer, cfg.max_length, same_tokenizer, **recipe)
    val_data: ExampleSet = build_examples(val_rows, tokenizer, cfg.max_length, same_tokenizer, **recipe)
    if not data.examples:
        raise RuntimeError(f"{operation}: no usable trace rows under {Path(out) / 'traces' / operation} "
                           f"({data.rows_total} rows, skipped {data.skipped})")
    repeats = {}
    if operation == "update" and cfg.targets.balance_update:
        data.examples, repeats = oversample_minority(data.examples)
    if operation == "generation" and cfg.targets.max_abstain_share is not None:
        data.examples, dropped = cap_abstaining(data.examples, cfg.targets.max_abstain_share)
        data.targets["abstaining_dropped"] = dropped
    top_k = max((len(step) for e in data.examples + val_data.examples if e.teacher_ids for step in e.teacher_ids),
                default=1)
    collator = Collator(tokenizer.pad_token_id, top_k, cfg.targets.event_weight if operation == "update" else 1.0)
    probe = data.examples[: 4 * cfg.batch_size]
    epochs = cfg.max_epochs_for(operation)
    total_steps = planned_steps(len(data.examples), cfg, world, epochs)

    work = adapter_work_dir(out, operation)
    args = TrainingArguments(
        output_dir=str(work),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        num_train_epochs=epochs,
        max_steps=cfg.max_steps or -1,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
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
    model = (resume_expert(model, init) if init else attach_expert(model, config.student.expert)).to(args.device)
    loss_before = mean_loss(model, probe, collator, cfg, args.device, cpu_bf16)
    val_before = (mean_loss(model, val_data.examples, collator, cfg, args.device, cpu_bf16)
                  if val_data.examples else None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    trainer = DistillTrainer(
        model=model, args=args, train_dataset=ExampleDataset(data.examples), data_collator=collator,
        kd_weight=cfg.kd_weight, kd_loss=cfg.kd_loss, jsd_beta=cfg.jsd_beta, cpu_bf16=cpu_bf16,
    )
    import weakref

    best = BestEpoch(weakref.ref(trainer), val_data.examples, collator, cfg, cfg.zero_stage, cpu_bf16)
    trainer.add_callback(best)
    train_metrics = trainer.train().metrics
    restored = best.restore_best()
    deviation = best.deviation()  # of the adapter as saved: the best epoch's
    loss_after = mean_loss(trainer.model_wrapped, probe, collator, cfg, trainer.args.device, cpu_bf16)
    tokens = torch.tensor([trainer.tokens_seen], dtype=torch.long)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tokens = tokens.to(trainer.args.device)
        torch.distributed.all_reduce(tokens)

    final = adapter_dir(out, operation)
    staging = final.parent / f".staging-{operation}"
    if rank == 0 and staging.exists():
        shutil.rmtree(staging)
    trainer.accelerator.wait_for_everyone()
    # The base as an OUT-relative path where it lives in OUT: a copied OUT must not point back at this machine.
    trainer.model.peft_config["default"].base_model_name_or_path = portable_base(base, out)
    with warnings.catch_warnings():  # peft looks for that relative path's config.json from the cwd, then on the
        # hub (offline here), to check a resized vocabulary: ours never is (no embedding is adapted)
        warnings.filterwarnings("ignore", message="Could not find a config file", category=UserWarning)
        trainer.save_model(str(staging))  # collective under ZeRO-3; only rank 0 writes
    trainer.accelerator.wait_for_everyone()
    if rank != 0:
        return None
    for leftover in ("training_args.bin", "README.md"):
        (staging / leftover).unlink(missing_ok=True)  # a pickle and a template card: not part of an adapter
    curve = [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h]
    grad_norms = [round(h["grad_norm"], 3) for h in trainer.state.log_history if "grad_norm" in h]
    record = TrainingRecord.from_dict({
        "operation": operation,
        "method": config.student.expert.method,
        "steps": trainer.state.global_step,
        "loss_curve": curve,
        "grad_norms": grad_norms,
        "loss_before": round(loss_before, 5),
        "loss_after": round(loss_after, 5),
        "epochs": best.epochs,
        "weight_deviation": deviation,
        "best_epoch": best.best_epoch,
        "best_restored": restored,
        "stopped_early": best.stopped_early,
        "validation_loss_before": round(val_before, 5) if val_before is not None else None,
        "validation_loss_best": round(best.best_loss, 5) if math.isfinite(best.best_loss) else None,
        "validation_rows": val_data.rows_used,
        "warmup_steps": args.warmup_steps,
        "learning_rate": cfg.learning_rate,
        "prompt": config.student.prompt,
        "prompt_tokens_mean": round(data.prompt_tokens / max(data.rows_used, 1), 1),
        "client_template": template.fingerprint if template is not None else "",
        "targets": data.targets,
        "oversampled": repeats,  # label -> repeat factor (update, train split only)
        "train_examples": len(data.examples),
        "tokens_seen": int(tokens.item()),
        "wall_time_s": round(time.perf_counter() - started, 2),
        "train_time_s": round(train_metrics["train_runtime"], 2),
        "step_time_s": round(train_metrics["train_runtime"] / max(trainer.state.global_step, 1), 3),
        "world_size": world,
        "global_batch_size": cfg.batch_size * cfg.gradient_accumulation_steps * world,
        "deepspeed_stage": cfg.zero_stage,
        "device": "cuda" if on_gpu else "cpu",
        "compute_dtype": "bfloat16" if on_gpu or cpu_bf16 else "float32",
        "rows_total": data.rows_total,
        "rows_used": data.rows_used,
        "rows_skipped": data.skipped,
        "rows_with_teacher_logprobs": data.with_logprobs,
        "shares_teacher_tokenizer": same_tokenizer,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trace_files": shard_names(files),  # by shard: a later compaction leaves them meaning the same calls
        "train_conversations": train_conversations,
        "validation_conversations": validation_conversations,
        "cache_key": cache["key"],
        "traces_sha256": cache["traces_sha256"],
        "config_fingerprint": cache["config_fingerprint"],
        "init_sha256": cache.get("init_sha256", ""),
        "shards_left_out": learnt,
        "base": str(base),
    })
    if template is not None:
        (staging / TEMPLATE_FILE).write_text(json.dumps(template.to_dict(), indent=1) + "\n")
    (staging / TRAINING_FILE).write_text(json.dumps(record.to_dict(on_disk=True), indent=2) + "\n")
    swap_in(staging, final)  # a collective save wrote it, so the staging name is fixed, not a context's
    shutil.rmtree(work, ignore_errors=True)
    return record
