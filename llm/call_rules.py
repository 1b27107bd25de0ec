"""Which memory operation a client's LLM call belongs to (`capture.rules`), decided from the request alone.

A client's memory system (Mem0, ...) sends its own prompts; its extraction and update calls are told apart by
the first message (Mem0's extraction system prompt begins "You are a Personal Information Organizer", its update
prompt "You are a smart memory manager") or by the model name the client was configured with.
"""

from __future__ import annotations

import hashlib

from memlora.config import CaptureRule


def first_message_text(messages: list[dict]) -> str:
    """Of plain role/content messages (`openai_protocol.plain_messages`)."""
    return (messages[0].get("content") or "") if messages else ""


def fingerprint(messages: list[dict]) -> str:
    """sha256 of the first message's text: names a client's template without storing it in the config."""
    return hashlib.sha256(first_message_text(messages).encode()).hexdigest()


def classify(rules: list[CaptureRule], messages: list[dict], model: str) -> CaptureRule | None:
    """The first rule that matches the request, or None."""
    head = first_message_text(messages)
    for rule in rules:
        if rule.system_contains is not None and rule.system_contains in head:
            return rule
        if rule.fingerprint is not None and fingerprint(messages).startswith(rule.fingerprint):
            return rule
        if rule.model is not None and rule.model == model:
            return rule
    return None


def schema_for(rules: list[CaptureRule], operation: str) -> dict | None:
    """The schema of the first rule for `operation` that carries one."""
    return next((r.output_schema for r in rules if r.operation == operation and r.output_schema), None)
