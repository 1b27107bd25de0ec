"""Teacher trace generation: replay a conversation through the memory system and record every call.

Each conversation is written as its own shard per operation (`traces/<op>/part-<conversation_id>.parquet`),
atomically and only once the conversation is complete, so a rerun after a crash skips finished conversations,
redoes the interrupted one from scratch, and can neither duplicate nor lose rows.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from memlora.config import OPERATIONS, Config
from memlora.data.io import write_parquet
from memlora.data.records import Conversation
from memlora.data.schemas import TRACES
from memlora.layout import memory_store, shard_path, trace_files
from memlora.llm.backends import build_backend
from memlora.llm.batcher import MicroBatcher
from memlora.llm.continuous import continuous_decoder
from memlora.memory.embedder import Embedder
from memlora.memory.llm import LLMBackend
from memlora.memory.store import MemoryStore
from memlora.memory.system import CallRecord, MemorySystem


class TracesIncomplete(RuntimeError):
    """Some conversations have no traces; the others' are written and kept."""


# Each shard names what it was traced from: a conversation that grew a session, was corrected or cut, or a
# teacher or memory system that changed, is traced again; before, its old shards stayed and kept training.
TRACE_KEY = b"memlora.trace_key"
TEACHER_FIELDS = {"backend", "model", "tokenizer", "dtype", "quantize", "logprobs_top_k"}  # not batching or device


def trace_key(conversation: Conversation, config: Config) -> str:
    """What one conversation's teacher calls depend on: its turns and questions as traced, the teacher, the
    memory system and the data caps that cut what is played (not its split, which moves no call)."""
    shaping = {
        "teacher": config.teacher.model_dump(mode="json", include=TEACHER_FIELDS),
        "memory": config.memory.model_dump(mode="json"),
        "data": config.data.model_dump(mode="json", include={"max_sessions", "max_questions"}),
        "turns": [[t.session, t.turn, t.dia_id, t.speaker, t.text, t.time.isoformat(), t.image_caption]
                  for t in conversation.turns],
        "questions": [[q.question, q.answer, q.adversarial_answer, q.category] for q in conversation.questions],
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def shard_key(path: Path) -> str | None:
    """The trace key a shard was written under; None for a shard written before keys were (taken as current),
    and a key no conversation has for a shard that cannot be read (it is traced again)."""
    try:
        return (pq.read_schema(path).metadata or {}).get(TRACE_KEY, b"").decode() or None
    except (OSError, pa.ArrowException):
        return "unreadable"


def is_traced(out: str | Path, conversation_id: str, key: str | None = None) -> bool:
    """All of the conversation's shards there, each written under `key` (or under none, by an older version)."""
    paths = [shard_path(out, op, conversation_id) for op in OPERATIONS]
    return all(p.is_file() for p in paths) and (key is None or all(shard_key(p) in (None, key) for p in paths))


def select_conversations(corpus: list[Conversation], config: Config,
                         out: str | Path) -> tuple[list[Conversation], list[Conversation]]:
    """(selected, still to trace): the train conversations (up to `data.max_conversations`) and the validation
    ones, whose teacher calls are what early stopping is measured on; the test ones are never traced here. A
    conversation whose shards were traced from other turns or another teacher is to trace again."""
    selected = [c for c in corpus if c.split == "train"][: config.data.max_conversations]
    selected += [c for c in corpus if c.split == "validation"]
    return selected, [c for c in selected if not is_traced(out, c.conversation_id, trace_key(c, config))]


def traced_before(out: str | Path, conversation_id: str) -> bool:
    """Whether a conversation to trace has shards already (they are replaced: it changed since)."""
    return any(shard_path(out, op, conversation_id).is_file() for op in OPERATIONS)


@dataclass
class TracingResources:
    """What the conversations of one process share; None where each task makes its own."""

    llm: LLMBackend | None = None
    embedder: Embedder | None = None
    store: MemoryStore | None = None


@contextmanager
def shared_resources(config: Config, out: str | Path, shared: bool) -> Iterator[TracingResources]:
    """One teacher for every conversation traced in this process, behind a micro-batcher that merges their
    calls into shared batches (a running one that calls join between decode steps, where the teacher is a local
    model), with one embedder and one store; closed on the way out. With `shared` off
    (process, Dask or Ray runners, where a task may run elsewhere) each task builds its own."""
    if not shared:
        yield TracingResources()
        return
    teacher = build_backend(config.teacher)
    size = config.teacher.batch_size
    llm = MicroBatcher(teacher, size, decoder=continuous_decoder(teacher, size)) \
        if config.prefect.concurrency > 1 else teacher
    store = MemoryStore(memory_store(out, "teacher"))
    try:
        yield TracingResources(llm, Embedder(config.memory.embedder), store)
    finally:
        store.close()
        if isinstance(llm, MicroBatcher):
            llm.close()


def record_to_row(record: CallRecord, model_id: str, backend: str) -> dict:
    result, parsed = record.result, record.parsed
    return {
        "trace_id": f"{record.conversation_id}:{record.operation}:{record.step}",
        "operation": record.operation,
        "conversation_id": record.conversation_id,
        "session": record.session,
        "step": record.step,
        "messages": record.request.messages,
        "output_schema": json.dumps(record.request.schema) if record.request.schema else None,
        "raw_output": result.text,
        "parsed_output": json.dumps(parsed.value) if parsed.ok else None,
        "parse_ok": parsed.ok,
        "parse_error": parsed.error,
        "constrained": result.constrained,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "completion_token_ids": result.token_ids,
        "top_logprobs": (
            [[{"token_id": t, "logprob": lp} for t, lp in step] for step in result.top_logprobs]
            if result.top_logprobs is not None
            else None
        ),
        "latency_s": result.latency_s,
        "batch_size": result.batch_size,
        "model_id": model_id,
        "backend": backend,
        "template_hash": record.template_hash,
        "decoding": json.dumps(result.extra["decoding"], sort_keys=True) if result.extra.get("decoding") else None,
    }


def trace_conversation(
    conversation: Conversation,
    llm: LLMBackend,
    embedder: Embedder,
    store: MemoryStore,
    config: Config,
) -> dict[str, list[dict]]:
    """Run one conversation through the memory system; return its trace rows per operation."""
    rows: dict[str, list[dict]] = {op: [] for op in OPERATIONS}
    cid = conversation.conversation_id
    store.clear(cid)  # an interrupted earlier attempt may have left memories behind
    system = MemorySystem(
        llm, store, embedder, config.memory,
        on_call=lambda r: rows[r.operation].append(record_to_row(r, llm.model_id, llm.backend_name)),
    )
    system.ingest(conversation, max_sessions=config.data.max_sessions)
    questions = conversation.questions[: config.data.max_questions] if config.data.max_questions else conversation.questions
    system.answer(cid, questions)
    return rows


def write_shards(out: str | Path, conversation_id: str, rows: dict[str, list[dict]],
                 key: str | None = None) -> dict[str, int]:
    """`key`: the conversation's trace_key, kept in each shard's metadata."""
    for op in OPERATIONS:
        table = pa.Table.from_pylist(rows[op], schema=TRACES)
        metadata = {TRACE_KEY: key.encode()} if key else None
        write_parquet(table, shard_path(out, op, conversation_id), "traces", metadata)
    return {op: len(rows[op]) for op in OPERATIONS}


def trace_summary(out: str | Path) -> dict:
    """Per operation: rows, parse_ok, constrained, and why the failures failed."""
    summary = {}
    for op in OPERATIONS:
        files = trace_files(out, op)
        if not files:
            summary[op] = {"rows": 0, "parse_ok": 0, "constrained": 0, "parse_errors": {}}
            continue
        table = pa.concat_tables(pq.read_table(f, columns=["parse_ok", "constrained", "parse_error"]) for f in files)
        ok = table.column("parse_ok").to_pylist()
        errors = Counter(e for e in table.column("parse_error").to_pylist() if e)
        summary[op] = {
            "rows": table.num_rows,
            "parse_ok": sum(ok),
            "constrained": sum(table.column("constrained").to_pylist()),
            "parse_errors": dict(errors.most_common(10)),
        }
    return summary
