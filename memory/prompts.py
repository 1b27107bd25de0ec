"""Prompt templates and output schemas of the three memory operations, kept side by side.

The bundled teacher is a 135M model: the prompts are short and carry few-shot examples, and each operation's
output is a small JSON object whose schema can drive constrained decoding.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from memlora.data.records import NOT_MENTIONED  # noqa: F401  (defined once, with the data it describes)

EVENTS = ("ADD", "UPDATE", "DELETE", "NONE")

EXTRACTION_SYSTEM = (
    "You are a personal information organizer. Read the conversation lines and extract the facts worth "
    "remembering about the people: personal details, jobs, family, pets, hobbies, preferences, plans, places "
    "and events with their dates. Write each fact as one short sentence that names the person. Ignore greetings "
    'and small talk. Reply with JSON only: {"facts": [...]}. If nothing is worth remembering, reply {"facts": []}.'
)

EXTRACTION_SHOTS = [
    (
        "Conversation on 8 May 2023:\nAlice: Hi Bob, how are you?\nBob: Good, thanks! And you?",
        {"facts": []},
    ),
    (
        "Conversation on 8 May 2023:\nAlice: I adopted a puppy named Max yesterday!\n"
        "Bob: Congrats! I have two cats, and I work as a nurse.",
        {
            "facts": [
                "Alice adopted a puppy named Max on 7 May 2023",
                "Bob has two cats",
                "Bob works as a nurse",
            ]
        },
    ),
]

UPDATE_SYSTEM = (
    "You manage a memory store. Compare the new fact with the existing memories and decide one event: "
    "ADD if the fact is new information (use the new id), UPDATE if it changes or refines an existing memory "
    "(keep its id, give the new text and put the previous text in old_memory), DELETE if it contradicts an "
    "existing memory so that memory is no longer true, NONE if the fact is already known. Reply with JSON "
    'only: {"memory": [{"id": ..., "text": ..., "event": ...}]}.'
)

UPDATE_SHOTS = [
    (
        "Existing memories:\n[]\nNew fact: Alice adopted a puppy named Max\nNew id: 0",
        {"memory": [{"id": "0", "text": "Alice adopted a puppy named Max", "event": "ADD"}]},
    ),
    (
        'Existing memories:\n[{"id": "0", "text": "Bob lives in Boston"}, {"id": "1", "text": "Bob has two cats"}]\n'
        "New fact: Bob moved to Denver\nNew id: 2",
        {
            "memory": [
                {"id": "0", "text": "Bob lives in Denver", "event": "UPDATE", "old_memory": "Bob lives in Boston"}
            ]
        },
    ),
    (
        'Existing memories:\n[{"id": "0", "text": "Alice likes pizza"}]\nNew fact: Alice likes pizza\nNew id: 1',
        {"memory": [{"id": "0", "text": "Alice likes pizza", "event": "NONE"}]},
    ),
    (
        'Existing memories:\n[{"id": "0", "text": "Carol owns a red car"}]\nNew fact: Carol sold her car\nNew id: 1',
        {"memory": [{"id": "0", "text": "Carol owns a red car", "event": "DELETE"}]},
    ),
]

# `memory.update_output: compact`: an entry the system leaves alone or deletes is only its id and event (the
# system has its text), so the event is decided right after the id and a NONE costs a few tokens, not the
# memory's whole text again.
UPDATE_SYSTEM_COMPACT = (
    "You manage a memory store. Compare the new fact with the existing memories and decide one event: "
    "ADD if the fact is new information (use the new id and give its text), UPDATE if it changes or refines an "
    "existing memory (keep its id, give the new text and put the previous text in old_memory), DELETE if it "
    "contradicts an existing memory so that memory is no longer true, NONE if the fact is already known. For "
    'DELETE and NONE give only the id and the event. Reply with JSON only: {"memory": [{"id": ..., "event": ...}]}.'
)


def _compact(entry: dict) -> dict:
    """The compact form of a full update entry: the event right after the id; text only where it is new."""
    out = {"id": entry["id"], "event": entry["event"]}
    if entry["event"] in ("ADD", "UPDATE"):
        out.update({k: v for k, v in entry.items() if k not in out})
    return out


UPDATE_SHOTS_COMPACT = [(user, {"memory": [_compact(e) for e in answer["memory"]]}) for user, answer in UPDATE_SHOTS]

GENERATION_SYSTEM = (
    "Answer the question about the people in the conversation using only the memories below. Each memory "
    "has the date it was stated. Answer in a few words. If the memories do not hold the answer, answer "
    f'"{NOT_MENTIONED}". Reply with JSON only: {{"answer": ...}}.'
)

GENERATION_SHOTS = [
    (
        "Memories:\n- [8 May 2023] Alice adopted a puppy named Max on 7 May 2023\n- [8 May 2023] Bob has two cats\n"
        "Question: What is the name of Alice's dog?",
        {"answer": "Max"},
    ),
    (
        "Memories:\n- [8 May 2023] Bob has two cats\nQuestion: Where does Bob's sister live?",
        {"answer": NOT_MENTIONED},
    ),
]


def _shots(pairs) -> list[dict]:
    messages = []
    for user, answer in pairs:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": json.dumps(answer)})
    return messages


@dataclass(frozen=True)
class Template:
    operation: str
    system: str
    shots: tuple

    def messages(self, user: str) -> list[dict]:
        return [{"role": "system", "content": self.system}, *_shots(self.shots), {"role": "user", "content": user}]

    @property
    def hash(self) -> str:
        """Identifies the template text: traces made with another wording must not be mixed silently."""
        blob = json.dumps({"op": self.operation, "system": self.system, "shots": self.shots}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


TEMPLATES = {
    "extraction": Template("extraction", EXTRACTION_SYSTEM, tuple(EXTRACTION_SHOTS)),
    "update": Template("update", UPDATE_SYSTEM, tuple(UPDATE_SHOTS)),
    "generation": Template("generation", GENERATION_SYSTEM, tuple(GENERATION_SHOTS)),
}
COMPACT_UPDATE = Template("update", UPDATE_SYSTEM_COMPACT, tuple(UPDATE_SHOTS_COMPACT))


def template(operation: str, update_output: str = "full") -> Template:
    """The teacher template an operation's calls are built with under `memory.update_output`."""
    return COMPACT_UPDATE if operation == "update" and update_output == "compact" else TEMPLATES[operation]


def templates(update_output: str = "full") -> dict[str, Template]:
    return {op: template(op, update_output) for op in TEMPLATES}


# --- student prompts (context distillation) ---------------------------------------------------------------

# One instruction line per operation: an expert learns the rest (the teacher's instructions and examples) from
# being trained on (this prompt -> the teacher's output under its full prompt).
STUDENT_SYSTEM = {
    "extraction": 'Extract the facts worth remembering as JSON {"facts": [...]}.',
    "update": 'Decide ADD, UPDATE, DELETE or NONE for the new fact as JSON {"memory": [...]}.',
    "generation": 'Answer the question from the memories as JSON {"answer": ...}.',
}


def is_own_prompt(operation: str, messages: list[dict]) -> bool:
    """Whether a call was built with our teacher template (else it is a captured client's)."""
    if operation not in TEMPLATES or not messages:
        return False
    return messages[0].get("content") in {template(operation, form).system for form in ("full", "compact")}


def own_operation(messages: list[dict]) -> str | None:
    """The operation whose prompt of ours a call was built with: our teacher template or the experts' minimal
    prompt (what a client of `serve-experts` may send instead); None for any other prompt."""
    head = messages[0].get("content") if messages else None
    return next((op for op in TEMPLATES if is_own_prompt(op, messages) or head == STUDENT_SYSTEM.get(op)), None)


def expert_messages(prompt: str, operation: str, messages: list[dict]) -> list[dict]:
    """What an expert reads under `student.prompt`: the minimal student prompt, or the teacher's as it is."""
    return student_messages(operation, messages) if prompt == "minimal" else messages


def student_messages(operation: str, messages: list[dict]) -> list[dict]:
    """The minimal student prompt for a request built with our teacher template: its one instruction line and
    the request's own input (the last user message). A prompt made by another template (a captured client's)
    is returned unchanged: it is not ours to shorten."""
    if not is_own_prompt(operation, messages):
        return messages
    return [{"role": "system", "content": STUDENT_SYSTEM[operation]}, messages[-1]]


# --- output schemas -------------------------------------------------------------------------------------


def extraction_schema(max_facts: int, max_chars: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "facts": {
                "type": "array",
                "items": {"type": "string", "minLength": 1, "maxLength": max_chars},
                "maxItems": max_facts,
            }
        },
        "required": ["facts"],
        "additionalProperties": False,
    }


def update_schema(shown_ids: list[str], new_id: str, max_chars: int, compact: bool = False) -> dict:
    """Ids are an enum of those shown in this very prompt, plus the next free one for an ADD only. `compact`: a
    NONE or DELETE entry is its id and event alone, and every entry puts the event before any text (the decoder
    writes properties in the schema's order)."""
    text = {"type": "string", "minLength": 1, "maxLength": max_chars}
    if compact:
        return _compact_update_schema(shown_ids, new_id, text)
    add = {
        "type": "object",
        "properties": {"id": {"type": "string", "enum": [new_id]}, "text": text, "event": {"type": "string", "enum": ["ADD"]}},
        "required": ["id", "text", "event"],
        "additionalProperties": False,
    }
    variants = [add]
    if shown_ids:
        variants.append(
            {
                "type": "object",
                "properties": {
                    "id": {"type": "string", "enum": list(shown_ids)},
                    "text": text,
                    "event": {"type": "string", "enum": ["UPDATE", "DELETE", "NONE"]},
                    "old_memory": {"type": "string", "maxLength": max_chars},
                },
                "required": ["id", "text", "event"],
                "additionalProperties": False,
            }
        )
    return _memory_list(variants, len(shown_ids) + 1)


def _compact_update_schema(shown_ids: list[str], new_id: str, text: dict) -> dict:
    def entry(ids: list[str], events: list[str], with_text: bool) -> dict:
        properties = {"id": {"type": "string", "enum": ids}, "event": {"type": "string", "enum": events}}
        if with_text:
            properties["text"] = text
        if events == ["UPDATE"]:
            properties["old_memory"] = {"type": "string", "maxLength": text["maxLength"]}
        return {"type": "object", "properties": properties, "required": list(properties)[:3 if with_text else 2],
                "additionalProperties": False}

    variants = [entry([new_id], ["ADD"], True)]
    if shown_ids:
        variants += [entry(list(shown_ids), ["UPDATE"], True), entry(list(shown_ids), ["DELETE", "NONE"], False)]
    return _memory_list(variants, len(shown_ids) + 1)


def _memory_list(variants: list[dict], most: int) -> dict:
    return {
        "type": "object",
        "properties": {
            "memory": {
                "type": "array",
                "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
                "minItems": 1,
                "maxItems": most,
            }
        },
        "required": ["memory"],
        "additionalProperties": False,
    }


def generation_schema(max_chars: int) -> dict:
    # A one-field object rather than free text: the model stops at the closing brace instead of rambling,
    # and a missing or cut answer is counted as parse_ok=false like every other operation.
    return {
        "type": "object",
        "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": max_chars}},
        "required": ["answer"],
        "additionalProperties": False,
    }
