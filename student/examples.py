"""Training examples from teacher traces: chat prompt -> teacher completion, loss on the completion only."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from memlora.data.io import read_parquet, sha256_file
from memlora.data.schemas import TRACES

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt
    prompt_len: int  # labels[prompt_len:] is the completion the loss is on
    # Per completion position (aligned with labels != IGNORE): the teacher's top-k ids and log-probs, or None.
    teacher_ids: list[list[int]] | None = None
    teacher_logprobs: list[list[float]] | None = None


@dataclass
class ExampleSet:
    examples: list[Example]
    rows_total: int
    rows_used: int
    skipped: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    with_logprobs: int = 0


def trace_files(out: str | Path, operation: str) -> list[Path]:
    return sorted((Path(out) / "traces" / operation).glob("part-*.parquet"))


def traces_fingerprint(files: list[Path]) -> str:
    import hashlib

    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() + sha256_file(f).encode())
    return digest.hexdigest()


def load_traces(files: list[Path]) -> pa.Table:
    if not files:
        return pa.Table.from_pylist([], schema=TRACES)
    return pa.concat_tables(read_parquet(f, "traces", TRACES) for f in files)


def build_examples(table: pa.Table, tokenizer, max_length: int, same_tokenizer: bool) -> ExampleSet:
    """Only parse_ok rows train; token ids and log-probs from the teacher are used where the vocabularies match."""
    skipped: dict[str, int] = {}
    examples: list[Example] = []
    tokens = with_lp = 0
    eos = tokenizer.eos_token_id
    rows = table.to_pylist()
    for row in rows:
        if not row["parse_ok"]:
            skipped["parse_failed"] = skipped.get("parse_failed", 0) + 1
            continue
        prompt = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if same_tokenizer and row["completion_token_ids"] is not None:
            completion = list(row["completion_token_ids"])
        else:
            completion = tokenizer(row["raw_output"], add_special_tokens=False)["input_ids"]
        teacher_tokens = len(completion)
        if row["finish_reason"] != "length":
            completion = completion + [eos]  # teach it to stop where the teacher stopped (not where it was cut)
        if len(prompt_ids) + len(completion) > max_length:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        teacher_ids = teacher_lps = None
        top = row["top_logprobs"] if same_tokenizer else None
        if top and len(top) == teacher_tokens:  # one top-k per teacher token; none for the EOS we add
            finite = [[t for t in step if t["logprob"] > float("-inf")] for step in top]
            teacher_ids = [[t["token_id"] for t in step] for step in finite]
            teacher_lps = [[t["logprob"] for t in step] for step in finite]
            with_lp += 1
        examples.append(
            Example(
                input_ids=prompt_ids + completion,
                labels=[IGNORE] * len(prompt_ids) + completion,
                prompt_len=len(prompt_ids),
                teacher_ids=teacher_ids,
                teacher_logprobs=teacher_lps,
            )
        )
        tokens += len(completion)
    return ExampleSet(examples, len(rows), len(examples), skipped, tokens, with_lp)
