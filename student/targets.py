"""What an expert learns to write, made from a teacher trace row (MemLoRA's target cleaning).

- extraction: the teacher's facts without exact or near duplicates (the bundled teacher repeats itself);
- update: the teacher's decisions without NONE entries that only restate memories the new fact leaves alone;
- generation: the gold answer where the trace's question has one (MemLoRA's teachers answered ~40 % right),
  else the teacher's answer; with `gold_supported`, only where the prompt's memories hold it.

A target that differs from the teacher's output is tokenized anew and trains on cross-entropy alone: the
teacher's token ids and log-probs describe the text it wrote, not ours.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from memlora.config import TargetsConfig
from memlora.layout import questions_file
from memlora.memory.prompts import NOT_MENTIONED

_WORD = re.compile(r"[a-z0-9]+")
QUESTION = re.compile(r"\nQuestion: (.*)\s*$", re.S)


@dataclass
class Target:
    text: str
    changed: bool  # differs from the teacher's raw output


@dataclass
class TargetStats:
    counts: Counter = field(default_factory=Counter)

    def as_dict(self) -> dict:
        return dict(sorted(self.counts.items()))


def _tokens(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def dedupe_facts(facts: list[str], threshold: float) -> tuple[list[str], int, int]:
    """Facts in order, each kept only if no earlier kept fact equals it (case and punctuation aside) or
    shares at least `threshold` of their words (Jaccard). Returns (kept, exact dropped, near dropped)."""
    kept: list[str] = []
    exact = near = 0
    for fact in facts:
        words = _tokens(fact)
        if any(_tokens(k) == words for k in kept):
            exact += 1
            continue
        if any(words and len(words & _tokens(k)) / len(words | _tokens(k)) >= threshold for k in kept):
            near += 1
            continue
        kept.append(fact)
    return kept, exact, near


def filter_update(entries: list[dict]) -> tuple[list[dict], int]:
    """Drop NONE entries when the fact changed something (an ADD, UPDATE or DELETE is there); when all are
    NONE, keep the first (the most similar memory: the one the fact restates). Returns (kept, dropped)."""
    acting = [e for e in entries if e.get("event") != "NONE"]
    kept = acting if acting else entries[:1]
    return kept, len(entries) - len(kept)


def question_of(messages: list[dict]) -> str | None:
    match = QUESTION.search(messages[-1]["content"]) if messages else None
    return match.group(1).strip() if match else None


_FUNCTION_WORDS = frozenset("a an the and or of in on at to for with by from is was are were be has had have he she "
                            "they his her their it its i you we my your our".split())


def supported(answer: str, messages: list[dict], share: float = 0.5) -> bool:
    """Whether the prompt's memories hold a gold answer: at least `share` of its content words appear in them
    (an adversarial question's "Not mentioned" always is). A gold answer they do not hold teaches the expert to
    make one up: on LoCoMo's training conversations that was most of them."""
    if answer == NOT_MENTIONED:
        return True
    words = _tokens(answer) - _FUNCTION_WORDS
    memories = messages[-1]["content"].split("\nQuestion:")[0] if messages else ""
    return not words or len(words & _tokens(memories)) >= share * len(words)


def gold_questions(out: str | Path) -> dict[tuple[str, str], tuple[str, int]]:
    """(conversation_id, question) -> (gold answer, LoCoMo category); adversarial questions (no answer) ->
    "Not mentioned"."""
    import pyarrow.parquet as pq

    path = questions_file(out)
    if not path.is_file():
        return {}
    rows = pq.read_table(path, columns=["conversation_id", "question", "answer", "category"]).to_pylist()
    gold = {}
    for row in rows:
        answer = row["answer"] if row["answer"] else (NOT_MENTIONED if row["category"] == 5 else None)
        if answer:
            gold[(row["conversation_id"], row["question"].strip())] = (str(answer), int(row["category"]))
    return gold


def gold_answers(out: str | Path) -> dict[tuple[str, str], str]:
    """(conversation_id, question) -> gold answer."""
    return {key: answer for key, (answer, _) in gold_questions(out).items()}


def make_target(row: dict, cfg: TargetsConfig, gold: dict[tuple[str, str], str], answer_max_chars: int,
                stats: TargetStats) -> Target:
    raw = row["raw_output"]
    op = row["operation"]
    try:
        value = json.loads(raw)
    except ValueError:
        value = None
    if op == "extraction" and cfg.dedupe_facts and isinstance(value, dict) and isinstance(value.get("facts"), list):
        kept, exact, near = dedupe_facts([str(f) for f in value["facts"]], cfg.near_duplicate)
        stats.counts["facts_in"] += len(value["facts"])
        stats.counts["facts_exact_duplicates_dropped"] += exact
        stats.counts["facts_near_duplicates_dropped"] += near
        if exact or near:
            return Target(json.dumps({**value, "facts": kept}), True)
    if op == "update" and cfg.drop_redundant_none and isinstance(value, dict) and isinstance(value.get("memory"), list):
        kept, dropped = filter_update(value["memory"])
        stats.counts["update_entries_in"] += len(value["memory"])
        stats.counts["update_none_dropped"] += dropped
        if dropped:
            return Target(json.dumps({**value, "memory": kept}), True)
    if op == "generation" and cfg.generation in ("gold", "gold_supported"):
        question = question_of(row["messages"])
        answer = gold.get((row["conversation_id"], question)) if question else None
        if answer is not None and cfg.generation == "gold_supported" and not supported(answer, row["messages"]):
            stats.counts["generation_gold_unsupported"] += 1
            answer = None
        if answer is not None:
            stats.counts["generation_gold"] += 1
            target = json.dumps({"answer": answer[:answer_max_chars]})
            return Target(target, target != raw)
        stats.counts["generation_teacher"] += 1
    return Target(raw, False)
