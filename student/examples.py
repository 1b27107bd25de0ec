"""Training examples from teacher traces: chat prompt -> teacher completion, loss on the completion only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from memlora.config import TargetsConfig
from memlora.data.compaction import shard_entries
from memlora.data.io import read_parquet
from memlora.data.schemas import TRACES
from memlora.data.split import captured_split
from memlora.evaluation.calibration import SERVED_BACKENDS
from memlora.evaluation.scoring import abstains
from memlora.layout import conversations_file
from memlora.llm.client_template import MISMATCH, ClientTemplate, expert_view
from memlora.llm.confidence import event_token_indices
from memlora.student.losses import IGNORE
from memlora.student.targets import Target, TargetStats, make_target


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE on the prompt
    prompt_len: int  # labels[prompt_len:] is the completion the loss is on
    # Per completion position (aligned with labels != IGNORE): the teacher's top-k ids and log-probs, or None.
    teacher_ids: list[list[int]] | None = None
    teacher_logprobs: list[list[float]] | None = None
    label: str | None = None  # update: the target's decision (ADD / UPDATE / DELETE / NONE), for balancing
    decision: list[int] | None = None  # update: completion positions of the tokens that spell its events


@dataclass
class ExampleSet:
    examples: list[Example]
    rows_total: int
    rows_used: int
    skipped: dict[str, int] = field(default_factory=dict)
    completion_tokens: int = 0
    with_logprobs: int = 0
    targets: dict = field(default_factory=dict)  # what target cleaning changed (counts)
    prompt_tokens: int = 0


def traces_fingerprint(files: list[Path]) -> str:
    """Over the shards the files hold (a merged file by its sources): a compaction changes nothing here."""
    import hashlib

    digest = hashlib.sha256()
    for name, sha in shard_entries(files):
        digest.update(name.encode() + sha.encode())
    return digest.hexdigest()


def load_traces(files: list[Path]) -> pa.Table:
    if not files:
        return pa.Table.from_pylist([], schema=TRACES)
    return pa.concat_tables(read_parquet(f, "traces", TRACES) for f in files)


def update_event(text: str) -> str | None:
    import json

    try:
        return json.loads(text)["memory"][0]["event"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None


ABSTAIN, ANSWER = "ABSTAIN", "ANSWER"  # generation labels: the target says the conversation does not hold it, or not


def label_of(operation: str, text: str) -> str | None:
    """What a target decides, for balancing: update's event, generation's abstain or answer."""
    if operation == "update":
        return update_event(text)
    if operation == "generation":
        try:
            answer = json.loads(text).get("answer", "")
        except (ValueError, AttributeError):
            return None
        return ABSTAIN if abstains(str(answer)) else ANSWER
    return None


def cap_abstaining(examples: list[Example], share: float) -> tuple[list[Example], int]:
    """At most `share` of the generation examples abstain; the ones over it (evenly spaced, so every conversation
    keeps some) are dropped. Greedy decoding returns the single likeliest answer, and one fixed sentence that a
    fifth of the targets share outweighs any one of the varied true answers on a question it is unsure of."""
    abstaining = [i for i, e in enumerate(examples) if e.label == ABSTAIN]
    answering = len(examples) - len(abstaining)
    keep = min(len(abstaining), int(share * answering / (1 - share)) if share < 1 else len(abstaining))
    chosen = {abstaining[round(k * len(abstaining) / keep)] for k in range(keep)} if keep else set()
    out = [e for i, e in enumerate(examples) if e.label != ABSTAIN or i in chosen]
    return out, len(examples) - len(out)


def oversample_minority(examples: list[Example]) -> tuple[list[Example], dict[str, int]]:
    """Repeat the examples of each rarer label sqrt(majority / its count) times (rounded down): the teacher
    says NONE to ~90 % of update calls, and an expert trained on that says NONE to everything (its macro-F1 is
    then exactly the majority-class baseline's). Returns the examples and the repeat factor per label."""
    import math
    from collections import Counter

    counts = Counter(e.label for e in examples if e.label is not None)
    if len(counts) < 2:
        return examples, {}
    majority = max(counts.values())
    factors = {label: max(1, int(math.sqrt(majority / n))) for label, n in counts.items()}
    out = []
    for e in examples:
        out += [e] * (factors.get(e.label, 1) if e.label is not None else 1)
    return out, factors


def conversation_splits(out: str | Path) -> dict[str, str]:
    """conversation_id -> train / validation / test, as ingest assigned them."""
    import pyarrow.parquet as pq

    path = conversations_file(out)
    if not path.is_file():
        return {}
    table = pq.read_table(path, columns=["conversation_id", "split"])
    return dict(zip(table.column("conversation_id").to_pylist(), table.column("split").to_pylist()))


def split_rows(table: pa.Table, splits: dict[str, str]) -> tuple[pa.Table, pa.Table]:
    """(train rows, validation rows) by each row's conversation; a conversation ingest did not mark as
    validation trains (traces made before validation existed), unless capture held it out. Test rows (captured
    calls capture put in its test share) are in neither."""
    backends = table.column("backend").to_pylist() if "backend" in table.column_names else [None] * table.num_rows
    side = [side_of(cid, splits, backend) for cid, backend in zip(table.column("conversation_id").to_pylist(),
                                                                 backends)]
    return (table.filter(pa.array([s == "train" for s in side], type=pa.bool_())),
            table.filter(pa.array([s == "validation" for s in side], type=pa.bool_())))


GONE = "gone"  # traced from a conversation OUT's corpus no longer holds (another corpus ingested since)


def side_of(conversation_id: str, splits: dict[str, str], backend: str | None = None) -> str:
    """train, validation or test for a trace row's conversation (split_rows); GONE for a row the teacher made from
    a conversation that is no longer in OUT's ingested corpus: a conversation taken out of the data (replaced, or
    deleted on a user's request) is taken out of training too. Calls a client sent (captured, deferred) are not
    in any corpus: their split is in their id."""
    if conversation_id in splits:
        split = splits[conversation_id]
    elif splits and backend is not None and backend not in SERVED_BACKENDS:
        return GONE
    else:
        split = captured_split(conversation_id)
    return split if split in ("validation", "test") else "train"


def split_conversations(table: pa.Table, splits: dict[str, str]) -> tuple[list[str], list[str]]:
    """The conversations whose rows train and validate under `splits` (split_rows), each sorted."""
    return tuple(sorted(set(side.column("conversation_id").to_pylist())) for side in split_rows(table, splits))


def build_examples(table: pa.Table, tokenizer, max_length: int, same_tokenizer: bool, *,
                   prompt: str = "teacher", targets: TargetsConfig | None = None,
                   gold: dict | None = None, answer_max_chars: int = 120,
                   template: ClientTemplate | None = None) -> ExampleSet:
    """Only parse_ok rows train; token ids and log-probs from the teacher are used where the vocabularies match
    and the target is the teacher's own output. `prompt="minimal"` trains on the student template
    (`memory.prompts.student_messages`), and a captured client's call is cut to what changes by its `template`
    (a call the template does not match is not trained on, and counted); `targets` cleans what the expert learns
    to write."""
    skipped: dict[str, int] = {}
    examples: list[Example] = []
    tokens = with_lp = prompt_total = 0
    eos = tokenizer.eos_token_id
    stats = TargetStats()
    rows = table.to_pylist()
    for row in rows:
        if not row["parse_ok"]:
            skipped["parse_failed"] = skipped.get("parse_failed", 0) + 1
            continue
        messages, how = expert_view(prompt, row["operation"], row["messages"], template)
        if how == MISMATCH:
            skipped["template_mismatch"] = skipped.get("template_mismatch", 0) + 1
            continue
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        target = (make_target(row, targets, gold or {}, answer_max_chars, stats) if targets is not None
                  else Target(row["raw_output"], False))
        if target.changed:
            stats.counts["targets_changed"] += 1
            completion = tokenizer(target.text, add_special_tokens=False)["input_ids"]
        elif same_tokenizer and row["completion_token_ids"] is not None:
            completion = list(row["completion_token_ids"])
        else:
            completion = tokenizer(row["raw_output"], add_special_tokens=False)["input_ids"]
        teacher_tokens = len(completion)
        # the update decision's tokens (1-2 of ~55, the rest mostly copied memory text), for event_weight
        decision = event_token_indices(tokenizer, completion) if row["operation"] == "update" else None
        if row["finish_reason"] != "length" or target.changed:
            completion = completion + [eos]  # teach it to stop where the teacher stopped (not where it was cut)
        if len(prompt_ids) + len(completion) > max_length:
            skipped["too_long"] = skipped.get("too_long", 0) + 1
            continue
        teacher_ids = teacher_lps = None
        top = row["top_logprobs"] if same_tokenizer and not target.changed else None
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
                label=label_of(row["operation"], target.text),
                decision=decision,
            )
        )
        tokens += len(completion)
        prompt_total += len(prompt_ids)
    return ExampleSet(examples, len(rows), len(examples), skipped, tokens, with_lp, stats.as_dict(), prompt_total)
