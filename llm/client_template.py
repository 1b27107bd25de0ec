"""The fixed part of a client's prompt, mined from its recorded calls: context distillation for captured clients.

A client's memory system (Mem0, ...) sends its instructions and few-shot examples on every call; a few lines
change (the conversation, the memories it shows, the new facts). A capture rule's template is the lines that
every recorded call of the rule shares, per message, in order. An expert trained with `student.prompt: minimal`
reads one instruction line and only the lines that change, each run of them under the fixed line before it (the
header that says what it is), and learns the rest from the teacher's answers to the whole prompt.

Lines are compared with their numbers masked: a date in the instructions ("Today's date is 2026-12-03") changes
every day without the client's template changing, while a new client release that rewrites its instructions is
a template that no longer matches: such a call is not reduced (`reduce` returns None), and is counted and kept out
of training rather than read as if nothing changed.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
import time
from collections import Counter
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path

from memlora.memory.prompts import STUDENT_SYSTEM, is_own_prompt, student_messages

HEADER_MAX_CHARS = 120  # a header is the first sentence of the fixed line before a run, cut to this
_NUMBER = re.compile(r"\d+")
_WORD = re.compile(r"[A-Za-z]{2}")
_CODE = re.compile(r"[{}\[\]\"`]")  # a line of an example's JSON or code is not a header


class TemplateError(ValueError):
    """No template can be mined (too few calls, calls that share no fixed part); the message says which and why."""


def masked(line: str) -> str:
    return _NUMBER.sub("#", line.rstrip())


@dataclass(frozen=True)
class ClientTemplate:
    operation: str
    roles: tuple[str, ...]                  # the messages' roles, in order
    fixed: tuple[tuple[str, ...], ...]      # per message, the lines every mined call shares (numbers masked)
    calls: int                              # calls it was mined from
    rule: str = ""                          # the capture rule, as the config states it
    mined_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    @property
    def fingerprint(self) -> str:
        blob = json.dumps({"operation": self.operation, "roles": self.roles, "fixed": self.fixed})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def fixed_lines(self) -> int:
        return sum(1 for lines in self.fixed for line in lines if line.strip())

    def to_dict(self) -> dict:
        return {"operation": self.operation, "fingerprint": self.fingerprint, "calls": self.calls, "rule": self.rule,
                "mined_at": self.mined_at, "roles": list(self.roles), "fixed": [list(f) for f in self.fixed]}

    @classmethod
    def from_dict(cls, data: dict) -> "ClientTemplate":
        template = cls(data["operation"], tuple(data["roles"]), tuple(tuple(f) for f in data["fixed"]),
                       int(data["calls"]), data.get("rule", ""), data.get("mined_at", ""))
        if data.get("fingerprint") not in (None, template.fingerprint):
            raise TemplateError(f"template of {data['operation']}: its lines do not match its fingerprint "
                                f"{data['fingerprint']} (edited by hand?)")
        return template


def _roles(messages: list[dict]) -> tuple[str, ...]:
    return tuple(m.get("role", "") for m in messages)


def _lines(message: dict) -> list[str]:
    return str(message.get("content") or "").split("\n")


def mine(operation: str, calls: list[list[dict]], min_calls: int, rule: str = "") -> ClientTemplate:
    """The lines every call shares, per message. Calls are taken in the message layout (roles) most of them
    have; the others do not shape the template (and will not reduce)."""
    if len(calls) < min_calls:
        raise TemplateError(f"{operation}: {len(calls)} recorded calls to find the fixed part of the client's "
                            f"prompt from; at least {min_calls} are needed (capture.template_min_calls): capture "
                            "more calls, or keep the whole prompt (student.prompt: teacher)")
    layout, _ = Counter(_roles(call) for call in calls).most_common(1)[0]
    same = [call for call in calls if _roles(call) == layout]
    fixed = []
    for i in range(len(layout)):
        shared = [masked(line) for line in _lines(same[0][i])]
        for call in same[1:]:
            theirs = [masked(line) for line in _lines(call[i])]
            blocks = SequenceMatcher(None, shared, theirs, autojunk=False).get_matching_blocks()
            shared = [shared[a + k] for a, _, size in blocks for k in range(size)]
        fixed.append(tuple(shared))
    template = ClientTemplate(operation, layout, tuple(fixed), len(same), rule)
    if template.fixed_lines == 0:
        raise TemplateError(f"{operation}: the {len(same)} recorded calls share no fixed line; nothing to cut, "
                            "the whole prompt is kept")
    return template


def changing_parts(template: ClientTemplate, messages: list[dict]) -> str | None:
    """The lines of `messages` outside the template, each run under its header; None when the call does not
    match the template (another layout, or a fixed line missing or out of order)."""
    if _roles(messages) != template.roles:
        return None
    parts = []
    for fixed, message in zip(template.fixed, messages):
        lines = _lines(message)
        ours = [masked(line) for line in lines]
        blocks = SequenceMatcher(None, list(fixed), ours, autojunk=False).get_matching_blocks()
        if sum(size for _, _, size in blocks) != len(fixed):
            return None
        covered = {b + k for _, b, size in blocks for k in range(size)}
        run: list[str] = []
        header = ""
        for j, line in enumerate([*lines, None]):
            if line is not None and j not in covered:
                run.append(line)
                continue
            text = textwrap.dedent("\n".join(run)).strip("\n")
            if text.strip():
                parts.append(f"{header}\n{text}" if header else text)
            run = []
            if line is not None and _WORD.search(line):  # a line of punctuation (```, }) keeps the header above it
                header = "" if _CODE.search(line) else _first_sentence(line)
    return "\n\n".join(parts)


def _first_sentence(line: str) -> str:
    text = line.strip()
    end = text.find(". ")
    text = text[:end + 1] if end > 0 else text
    return text if len(text) <= HEADER_MAX_CHARS else text[:HEADER_MAX_CHARS].rsplit(" ", 1)[0] + " ..."


def expert_messages(template: ClientTemplate, messages: list[dict], instruction: str) -> list[dict] | None:
    """What the expert reads of a client's call: the instruction line and the changing parts (None: no match)."""
    parts = changing_parts(template, messages)
    if parts is None:
        return None
    return [{"role": "system", "content": instruction}, {"role": "user", "content": parts}]


AS_SENT, MINIMAL, REDUCED, MISMATCH = "as_sent", "minimal", "reduced", "template_mismatch"


def expert_view(prompt: str, operation: str, messages: list[dict],
                template: ClientTemplate | None) -> tuple[list[dict], str]:
    """What an expert reads of a call under `student.prompt`, and how it was read: MINIMAL (our own prompt cut to
    its input), REDUCED (a client's cut to its changing parts), AS_SENT (prompt `teacher`, or a client with no
    template), MISMATCH (a client's call its template does not match: read whole, and the caller counts it)."""
    if prompt != "minimal":
        return messages, AS_SENT
    if is_own_prompt(operation, messages):
        return student_messages(operation, messages), MINIMAL
    if template is None or template.operation != operation:
        return messages, AS_SENT
    reduced = expert_messages(template, messages, STUDENT_SYSTEM[operation])
    return (messages, MISMATCH) if reduced is None else (reduced, REDUCED)


def read_template(path: Path) -> ClientTemplate:
    try:
        return ClientTemplate.from_dict(json.loads(Path(path).read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise TemplateError(f"{path}: not a client template: {err}") from None


# --- stored in OUT, one file per operation, every version kept ---------------------------------------------

def read_versions(path: Path) -> dict:
    if not path.is_file():
        return {"current": None, "versions": []}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise TemplateError(f"{path}: not a template file: {err}") from None


def current(path: Path) -> ClientTemplate | None:
    data = read_versions(path)
    for version in data["versions"]:
        if version["fingerprint"] == data["current"]:
            return ClientTemplate.from_dict(version)
    return None


def store(path: Path, template: ClientTemplate) -> bool:
    """Make `template` the current one (kept beside the earlier versions); False when it already was."""
    data = read_versions(path)
    if data["current"] == template.fingerprint:
        return False
    data["versions"] = [v for v in data["versions"] if v["fingerprint"] != template.fingerprint]
    data["versions"].append(template.to_dict())
    data["current"] = template.fingerprint
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    return True
