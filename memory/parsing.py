"""Tolerant parsing of model output: recover the JSON object from the usual LLM noise, or say why not.

Never raises on model output: a failure comes back as `Parsed(ok=False, error=...)` so the caller keeps the
raw text, counts it and moves on.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass

from memlora.memory.prompts import EVENTS

FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
TRAILING_COMMA = re.compile(r",\s*([}\]])")


@dataclass(frozen=True)
class Parsed:
    ok: bool
    value: dict | None = None
    error: str | None = None


def _first_object(text: str) -> str | None:
    """The first balanced {...} span, honouring strings, so trailing prose is ignored."""
    start = text.find("{")
    while start != -1:
        depth, in_str, quote, escape = 0, False, "", False
        for i in range(start, len(text)):
            ch = text[i]
            if in_str:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == quote:
                    in_str = False
            elif ch in "\"'":
                in_str, quote = True, ch
            elif ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.find("{", start + 1)
    return None


def extract_json(text: str) -> Parsed:
    if not text or not text.strip():
        return Parsed(False, error="empty output")
    fenced = FENCE.search(text)
    candidate = _first_object(fenced.group(1) if fenced else text)
    if candidate is None:
        return Parsed(False, error="no complete JSON object (truncated output or prose)")
    for attempt in (candidate, TRAILING_COMMA.sub(r"\1", candidate)):
        try:
            value = json.loads(attempt)
            break
        except json.JSONDecodeError:
            value = None
    if value is None:
        try:  # single quotes, Python literals
            value = ast.literal_eval(TRAILING_COMMA.sub(r"\1", candidate).replace("null", "None"))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return Parsed(False, error="not valid JSON")
    if not isinstance(value, dict):
        return Parsed(False, error="JSON is not an object")
    return Parsed(True, value)


def parse_extraction(text: str) -> Parsed:
    parsed = extract_json(text)
    if not parsed.ok:
        return parsed
    facts = parsed.value.get("facts")
    if not isinstance(facts, list):
        return Parsed(False, error="field 'facts' missing or not a list")
    if not all(isinstance(f, str) for f in facts):
        return Parsed(False, error="field 'facts' holds a non-string item")
    return Parsed(True, {"facts": [f.strip() for f in facts if f.strip()]})


def parse_update(text: str, shown_ids: list[str], new_id: str) -> Parsed:
    """Check events and ids against what the prompt showed: an invented id is never applied. ADD and UPDATE need
    their text; NONE and DELETE may leave it out (`memory.update_output: compact`), the system has it."""
    parsed = extract_json(text)
    if not parsed.ok:
        return parsed
    items = parsed.value.get("memory")
    if not isinstance(items, list):
        return Parsed(False, error="field 'memory' missing or not a list")
    clean = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return Parsed(False, error=f"memory[{i}] is not an object")
        event = item.get("event")
        if event not in EVENTS:
            return Parsed(False, error=f"memory[{i}].event {event!r} is not one of {', '.join(EVENTS)}")
        mid = str(item.get("id")) if item.get("id") is not None else None
        text_value = item.get("text", "" if event in ("NONE", "DELETE") else None)
        if not isinstance(text_value, str):
            return Parsed(False, error=f"memory[{i}].text missing or not a string")
        if event == "ADD":
            mid = new_id
        elif mid not in shown_ids:
            return Parsed(False, error=f"memory[{i}].id {mid!r} was not shown in the prompt")
        entry = {"id": mid, "text": text_value.strip(), "event": event}
        if isinstance(item.get("old_memory"), str):
            entry["old_memory"] = item["old_memory"]
        clean.append(entry)
    return Parsed(True, {"memory": clean})


def parse_generation(text: str) -> Parsed:
    parsed = extract_json(text)
    if parsed.ok:
        answer = parsed.value.get("answer")
        if isinstance(answer, (str, int, float)) and not isinstance(answer, bool) and str(answer).strip():
            return Parsed(True, {"answer": str(answer).strip()})
        return Parsed(False, error="field 'answer' missing or empty")
    if text and text.strip() and "{" not in text:
        # Free decoding may answer in plain words; that is still an answer.
        return Parsed(True, {"answer": text.strip().splitlines()[0].strip()})
    return parsed
