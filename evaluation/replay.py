"""Recording a system's model calls, and replaying the teacher's recorded requests to another system.

Every call becomes one row (`CALLS` below). Rows keep the `generate` call ("group") of the memory system they
were made in, so a replay sends the very same requests in the very same groups, the test conversations at once
as in the end-to-end run (their groups merge into shared model batches as they arrive): per-call latencies of
two systems are then measured on the same work, batched the same way up to timing.
"""

from __future__ import annotations

import json
import re
import time
from typing import Callable, Iterable

import jsonschema
import pyarrow as pa

from memlora.config import MemoryConfig
from memlora.llm.batcher import in_threads
from memlora.memory.llm import GenerationRequest, GenerationResult, LLMBackend
from memlora.memory.parsing import Parsed, parse_extraction, parse_generation, parse_update
from memlora.memory.prompts import extraction_schema, generation_schema, update_schema
from memlora.memory.system import CallRecord

# Phases of a system's run:
E2E = "e2e"              # its own memory over the test conversation, then the gold questions
FORCED = "forced"        # the teacher's end-to-end requests, as they were (schema included)
FORCED_FREE = "forced_free"  # the same requests without their schema: free decoding

CALLS = pa.schema([
    pa.field("system", pa.string(), nullable=False),
    pa.field("phase", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),        # position within (system, phase)
    pa.field("ref_index", pa.int32(), nullable=False),    # the teacher's e2e row it replays (e2e: itself)
    pa.field("group", pa.int32(), nullable=False),        # the generate() batch it was part of
    pa.field("operation", pa.string(), nullable=False),
    pa.field("conversation_id", pa.string(), nullable=False),
    pa.field("session", pa.int32(), nullable=False),
    pa.field("step", pa.int32(), nullable=False),
    pa.field("question_id", pa.int32()),
    pa.field("messages", pa.string(), nullable=False),    # JSON list of {role, content}
    pa.field("output_schema", pa.string()),               # JSON schema decoding was constrained to, or null
    pa.field("max_new_tokens", pa.int32(), nullable=False),
    pa.field("raw_output", pa.string(), nullable=False),
    pa.field("parsed_output", pa.string()),
    pa.field("parse_ok", pa.bool_(), nullable=False),
    pa.field("parse_error", pa.string()),
    pa.field("schema_valid", pa.bool_(), nullable=False),  # the whole output is one JSON object valid under
    pa.field("constrained", pa.bool_(), nullable=False),   # the operation's schema (strict, no repair)
    pa.field("finish_reason", pa.string()),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("latency_s", pa.float64(), nullable=False),
    pa.field("batch_size", pa.int32(), nullable=False),
    # A served system's calls (`evaluation.served`): expert, expert-demoted, expert-unsure, teacher; else null
    pa.field("answered_by", pa.string()),
])

NEW_ID = re.compile(r"New id: (\d+)\s*$")


def update_ids(messages: list[dict]) -> tuple[list[str], str]:
    """The ids an update prompt showed and its free id, read back from the prompt (`render_update` numbers the
    shown memories 0..n-1 and offers n as the new id), so free output is checked exactly as constrained."""
    match = NEW_ID.search(messages[-1]["content"])
    new_id = match.group(1) if match else "0"
    return [str(i) for i in range(int(new_id))], new_id


def parse_output(operation: str, messages: list[dict], text: str) -> Parsed:
    if operation == "extraction":
        return parse_extraction(text)
    if operation == "update":
        shown, new_id = update_ids(messages)
        return parse_update(text, shown, new_id)
    if operation == "generation":
        return parse_generation(text)
    raise ValueError(f"unknown operation {operation!r}")


def reference_schema(operation: str, messages: list[dict], memory: MemoryConfig) -> dict:
    """The schema an operation's output must follow (what constrained decoding enforces)."""
    if operation == "extraction":
        return extraction_schema(memory.max_facts, memory.fact_chars())
    if operation == "update":
        shown, new_id = update_ids(messages)
        return update_schema(shown, new_id, memory.max_fact_chars, memory.update_output == "compact")
    return generation_schema(memory.answer_max_chars)


def schema_valid(text: str, schema: dict) -> bool:
    try:
        value = json.loads(text.strip())
        jsonschema.validate(value, schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def make_row(system: str, phase: str, index: int, ref_index: int, group: int, request: GenerationRequest,
             result: GenerationResult, parsed: Parsed, memory: MemoryConfig, *, conversation_id: str,
             session: int, step: int, question_id: int | None = None) -> dict:
    return {
        "system": system, "phase": phase, "index": index, "ref_index": ref_index, "group": group,
        "operation": request.operation, "conversation_id": conversation_id, "session": session, "step": step,
        "question_id": question_id,
        "messages": json.dumps(request.messages),
        "output_schema": json.dumps(request.schema) if request.schema is not None else None,
        "max_new_tokens": request.max_new_tokens,
        "raw_output": result.text,
        "parsed_output": json.dumps(parsed.value) if parsed.ok else None,
        "parse_ok": parsed.ok, "parse_error": parsed.error,
        "schema_valid": schema_valid(result.text, reference_schema(request.operation, request.messages, memory)),
        "constrained": request.schema is not None,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "latency_s": result.latency_s, "batch_size": result.batch_size,
        "answered_by": result.extra.get("answered_by"),
    }


class GroupingLLM:
    """Passes calls through to a backend and numbers each `generate` call (a batch the memory system made)."""

    def __init__(self, inner: LLMBackend):
        self.inner = inner
        self.model_id, self.backend_name = inner.model_id, inner.backend_name
        self.group = -1

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.group += 1
        return self.inner.generate(requests)


class CallRecorder:
    """The memory system's `on_call` hook: one row per call, in call order."""

    def __init__(self, system: str, llm: GroupingLLM, memory: MemoryConfig):
        self.system, self.llm, self.memory = system, llm, memory
        self.rows: list[dict] = []

    def __call__(self, record: CallRecord) -> None:
        index = len(self.rows)
        self.rows.append(make_row(
            self.system, E2E, index, index, self.llm.group, record.request, record.result, record.parsed,
            self.memory, conversation_id=record.conversation_id, session=record.session, step=record.step,
        ))


def request_of(row: dict, free: bool = False) -> GenerationRequest:
    schema = None if free or row["output_schema"] is None else json.loads(row["output_schema"])
    return GenerationRequest(row["operation"], json.loads(row["messages"]), int(row["max_new_tokens"]), schema)


def replay(backend: LLMBackend, reference: Iterable[dict], system: str, phase: str, memory: MemoryConfig,
           *, free: bool = False, running: bool = False,
           progress: Callable[[str], None] = lambda line: None) -> list[dict]:
    """Send the reference rows' requests to `backend`, batch by batch as they were first made; the
    conversations at once (one thread each, calls merged into shared batches, or joining one running batch with
    `running`), as the reference ran."""
    conversations: dict[str, list[dict]] = {}
    for row in reference:
        conversations.setdefault(row["conversation_id"], []).append(row)
    total = sum(map(len, conversations.values()))
    done = [0]
    started = time.perf_counter()
    last = [started]

    def job(members: list[dict]):
        def run(llm: LLMBackend) -> list[dict]:
            groups: dict[int, list[dict]] = {}
            for row in members:
                groups.setdefault(row["group"], []).append(row)
            rows: list[dict] = []
            for group, batch in sorted(groups.items()):
                if time.perf_counter() - last[0] > 10:  # a line every 10 s at most
                    last[0] = time.perf_counter()
                    progress(f"{system}: {phase}: {done[0]}/{total} calls, {last[0] - started:.0f} s")
                requests = [request_of(r, free) for r in batch]
                for ref, request, result in zip(batch, requests, llm.generate(requests)):
                    rows.append(make_row(
                        system, phase, 0, ref["index"], group, request, result,
                        parse_output(request.operation, request.messages, result.text), memory,
                        conversation_id=ref["conversation_id"], session=ref["session"], step=ref["step"],
                        question_id=ref["question_id"],
                    ))
                done[0] += len(batch)
            return rows
        return run

    parts = in_threads([job(members) for members in conversations.values()], backend, running=running)
    rows = [row for part in parts for row in part]
    for i, row in enumerate(rows):
        row["index"] = i
    return rows


def as_forced(rows: list[dict]) -> list[dict]:
    """The teacher's own e2e calls are, by definition, its answers to the teacher-forced requests."""
    return [{**r, "phase": FORCED} for r in rows]
