"""Heal a layer-pruned student: distil it toward the full teacher on text before any expert is trained.

Cutting layers leaves a student that can no longer read its input (see bench/prune_depth.py); experts trained
on top of it learn the training conversations' names, not to read. Healing trains the cut base to match the
teacher's whole next-token distribution (token-level KL, teacher run in-process: same tokenizer) on the train
conversations' text and the teacher's own calls, with a LoRA that is merged afterwards, so the healed base is a
plain safetensors model that every later stage loads as before. Runs in every DeepSpeed rank
(`train_entry --task heal`), like an expert's training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from itertools import chain, zip_longest
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from memlora.config import OPERATIONS, Config, HealConfig
from memlora.data.io import publishing
from memlora.layout import conversations_file, trace_files
from memlora.llm.hf_backend import load_causal_lm
from memlora.student.build import MARKER
from memlora.student.examples import conversation_splits, load_traces
from memlora.student.trainer import deepspeed_config


def session_texts(out: str | Path, splits: dict[str, str]) -> dict[str, list[str]]:
    """Each session of each conversation as one transcript, by split."""
    import pyarrow.parquet as pq

    path = conversations_file(out)
    by_split: dict[str, list[str]] = {}
    if not path.is_file():
        return by_split
    rows = pq.read_table(path, columns=["conversation_id", "session", "speaker", "text"]).to_pylist()
    sessions: dict[tuple[str, int], list[str]] = {}
    for r in rows:
        sessions.setdefault((r["conversation_id"], r["session"]), []).append(f"{r['speaker']}: {r['text']}")
    for (cid, _), lines in sessions.items():
        by_split.setdefault(splits.get(cid, "train"), []).append("\n".join(lines))
    return by_split


def trace_texts(out: str | Path, tokenizer, splits: dict[str, str]) -> dict[str, list[list[str]]]:
    """Each trace call rendered as the teacher read and wrote it, per operation, by split. The system prompt
    (instructions and few-shot examples, the same in every call) is kept once per operation, not per call."""
    by_split: dict[str, list[list[str]]] = {}
    for op in OPERATIONS:
        seen_system: set[str] = set()
        per_split: dict[str, list[str]] = {}
        for row in load_traces(trace_files(out, op)).to_pylist():
            messages = row["messages"]
            if messages and messages[0]["role"] == "system":
                if messages[0]["content"] in seen_system:
                    messages = messages[1:]
                else:
                    seen_system.add(messages[0]["content"])
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            per_split.setdefault(splits.get(row["conversation_id"], "train"), []).append(text + row["raw_output"])
        for split, texts in per_split.items():
            by_split.setdefault(split, []).append(texts)
    return by_split


def round_robin(sources: list[list[str]]) -> list[str]:
    """One text from each source in turn, so a token budget covers every source."""
    return [t for t in chain.from_iterable(zip_longest(*sources)) if t is not None]


def pack(texts: list[str], tokenizer, chunk: int, budget: int) -> list[list[int]]:
    """Texts joined by EOS and cut into equal chunks (no padding), up to `budget` tokens."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(ids) >= budget:
            break
    ids = ids[:budget]
    return [ids[i : i + chunk] for i in range(0, len(ids) - chunk + 1, chunk)]


def healing_chunks(out: str | Path, tokenizer, cfg: HealConfig) -> tuple[list[list[int]], list[list[int]], str]:
    """(train chunks, held-out chunks, where the held-out text came from). Test conversations never enter."""
    splits = conversation_splits(out)
    sessions, traces = session_texts(out, splits), trace_texts(out, tokenizer, splits)
    train = round_robin([sessions.get("train", []), *traces.get("train", [])])
    held = round_robin([sessions.get("validation", []), *traces.get("validation", [])])
    train_chunks = pack(train, tokenizer, cfg.chunk_tokens, cfg.max_tokens)
    if held:
        return train_chunks, pack(held, tokenizer, cfg.chunk_tokens, cfg.held_out_tokens), "validation conversations"
    n = max(1, cfg.held_out_tokens // cfg.chunk_tokens)
    if len(train_chunks) <= n:
        raise ValueError(f"student.heal: {len(train_chunks)} chunks of healing text under {out}; need more than "
                         f"{n} to hold some out (lower heal.chunk_tokens or heal.held_out_tokens)")
    return train_chunks[:-n], train_chunks[-n:], "last train chunks (no validation split)"


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on the full vocabulary."""
    t = F.log_softmax(teacher_logits.float(), dim=-1)
    s = F.log_softmax(student_logits.float(), dim=-1)
    return (t.exp() * (t - s)).sum(-1).mean()


@torch.no_grad()
def held_out_kl(student, teacher, chunks: list[list[int]], batch: int, device) -> float:
    was_training = student.training
    student.eval()
    total, n = 0.0, 0
    for i in range(0, len(chunks), batch):
        ids = torch.tensor(chunks[i : i + batch], device=device)
        total += float(token_kl(teacher(input_ids=ids).logits, student(input_ids=ids).logits)) * len(ids)
        n += len(ids)
    student.train(was_training)
    return total / max(n, 1)


class Chunks(Dataset):
    def __init__(self, chunks: list[list[int]]):
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": torch.tensor(self.chunks[i])}


class HealTrainer(Trainer):
    def __init__(self, *args, teacher, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs["input_ids"]
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids).logits
        outputs = model(input_ids=ids)
        loss = token_kl(teacher_logits, outputs.logits)
        return (loss, outputs) if return_outputs else loss


def heal_base(config: Config, out: str | Path, pruned: str | Path, target: str | Path) -> dict | None:
    """Heal the base in `pruned` into `target` (rank 0 writes it atomically) and return the healing record."""
    from peft import LoraConfig, get_peft_model


    cfg = config.student.heal
    rank = int(os.environ.get("RANK", "0"))
    on_gpu = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "") != "cpu"
    started = time.perf_counter()
    student, tokenizer, _ = load_causal_lm(str(pruned), dtype="float32", device="cpu",
                                           trust_remote_code=config.student.trust_remote_code)
    teacher, _, _ = load_causal_lm(config.teacher.model, tokenizer_ref=config.teacher.tokenizer,
                                   dtype="bfloat16" if on_gpu else "float32", device="cpu",
                                   trust_remote_code=config.teacher.trust_remote_code)
    teacher.requires_grad_(False)
    train, held, held_source = healing_chunks(out, tokenizer, cfg)
    work = Path(target).parent / ".heal-work"
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs, lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.1 * steps_per_epoch * cfg.epochs), logging_steps=1, save_strategy="no",
        report_to=[], remove_unused_columns=False, seed=cfg.seed, bf16=on_gpu, max_grad_norm=1.0,
        # ZeRO-2 at most: the frozen base stays whole on every rank, so the LoRA merges without a gather.
        deepspeed=deepspeed_config(2, on_gpu), use_cpu=not on_gpu, disable_tqdm=True, dataloader_num_workers=0,
    )
    teacher.to(args.device)
    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.r, lora_dropout=0.0, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = get_peft_model(student, lora).to(args.device)
    kl_before = held_out_kl(model, teacher, held, cfg.batch_size, args.device)
    trainer = HealTrainer(model=model, args=args, train_dataset=Chunks(train), teacher=teacher)
    metrics = trainer.train().metrics
    trainer.accelerator.wait_for_everyone()
    if rank != 0:
        return None
    healed = trainer.model.merge_and_unload()
    kl_after = held_out_kl(healed, teacher, held, cfg.batch_size, args.device)
    record = {
        "kl_before": round(kl_before, 5), "kl_after": round(kl_after, 5),
        "held_out_tokens": sum(map(len, held)), "held_out_source": held_source,
        "train_tokens": sum(map(len, train)), "epochs": cfg.epochs, "steps": trainer.state.global_step,
        "loss_curve": [round(h["loss"], 5) for h in trainer.state.log_history if "loss" in h],
        "train_time_s": round(metrics["train_runtime"], 2), "wall_time_s": round(time.perf_counter() - started, 2),
        "device": "cuda" if on_gpu else "cpu",
    }
    marker = json.loads((Path(pruned) / MARKER).read_text())
    marker["healing"] = record
    with publishing(target) as staging:
        healed.to("cpu").to(torch.float32).save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        (staging / MARKER).write_text(json.dumps(marker, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return record
