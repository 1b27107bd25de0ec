"""LLM-as-judge: a configurable model labels each end-to-end answer CORRECT or WRONG against the gold answer,
decoding under a JSON schema (the Mem0 paper's judge, made schema-constrained)."""

from __future__ import annotations

import re

import pyarrow as pa

from memlora.memory.llm import GenerationRequest, LLMBackend
from memlora.memory.parsing import extract_json
from memlora.memory.prompts import NOT_MENTIONED

LABELS = ("CORRECT", "WRONG")

JUDGE_SYSTEM = (
    "You grade answers to questions about a conversation. Compare the generated answer with the gold answer and "
    "label it CORRECT if it says the same thing, even in other words, shorter or longer, or with a date written "
    "another way; label it WRONG if it says something else or nothing. If the gold answer is "
    f'"{NOT_MENTIONED}", only an answer saying the conversation does not tell is CORRECT. '
    'Reply with JSON only: {"label": "CORRECT"} or {"label": "WRONG"}.'
)

JUDGE_SCHEMA = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": list(LABELS)}},
    "required": ["label"],
    "additionalProperties": False,
}

JUDGEMENTS = pa.schema([
    pa.field("system", pa.string(), nullable=False),
    pa.field("conversation_id", pa.string(), nullable=False),
    pa.field("question_id", pa.int32(), nullable=False),
    pa.field("label", pa.string(), nullable=False),
    pa.field("judged", pa.bool_(), nullable=False),          # false: empty answer, WRONG without asking
    pa.field("judge_parse_ok", pa.bool_(), nullable=False),
    pa.field("judge_output", pa.string()),
])

_BARE = re.compile(r"\b(CORRECT|WRONG)\b")


def judge_request(question: str, gold: str, answer: str, max_new_tokens: int, constrained: bool = True
                  ) -> GenerationRequest:
    user = f"Question: {question}\nGold answer: {gold}\nGenerated answer: {answer}"
    return GenerationRequest(
        operation="judge",
        messages=[{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}],
        max_new_tokens=max_new_tokens,
        schema=JUDGE_SCHEMA if constrained else None,
    )


def parse_label(text: str) -> str | None:
    """The label of a judge's output: the JSON field, or a bare CORRECT/WRONG from a judge decoding freely."""
    parsed = extract_json(text)
    if parsed.ok and str(parsed.value.get("label", "")).upper() in LABELS:
        return str(parsed.value["label"]).upper()
    match = _BARE.search(text or "")
    return match.group(1) if match else None


def judge_answers(backend: LLMBackend, qa_rows: list[dict], max_new_tokens: int) -> list[dict]:
    """One judgement per QA row; identical (question, gold, answer) triples are asked once."""
    keys = {}
    for row in qa_rows:
        if row["answer"].strip():
            keys.setdefault((row["question"], row["gold"], row["answer"]), None)
    triples = list(keys)
    results = backend.generate([judge_request(q, g, a, max_new_tokens) for q, g, a in triples]) if triples else []
    outputs = {t: r.text for t, r in zip(triples, results)}
    judged = []
    for row in qa_rows:
        key = (row["question"], row["gold"], row["answer"])
        text = outputs.get(key)
        label = parse_label(text) if text is not None else None
        judged.append({
            "system": row["system"], "conversation_id": row["conversation_id"], "question_id": row["question_id"],
            "label": label or "WRONG", "judged": text is not None, "judge_parse_ok": label is not None,
            "judge_output": text,
        })
    return judged
