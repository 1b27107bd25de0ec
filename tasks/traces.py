"""Tasks of trace generation."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.data.records import Conversation
from memlora.layout import memory_store
from memlora.llm.backends import build_backend
from memlora.memory.embedder import Embedder
from memlora.memory.llm import LLMBackend
from memlora.memory.store import MemoryStore
from memlora.teacher.traces import trace_conversation, write_shards


@task(name="trace-conversation", cache_policy=NONE, task_run_name="trace-{conversation.conversation_id}")
def trace_conversation_task(
    conversation: Conversation, config: Config, out: str, llm: LLMBackend | None = None,
    embedder: Embedder | None = None, store: MemoryStore | None = None,
) -> dict[str, int]:
    """With `llm`, `embedder` and `store` from the flow (thread runner: one process, shared model batches); without
    them the task makes its own (process, Dask or Ray runners, where a task may run on another machine): an
    HTTP teacher client, an embedder and a SQLite store of its own under OUT/memory/."""
    own = llm is None
    if own:
        llm = build_backend(config.teacher)
        embedder = Embedder(config.memory.embedder)
        store = MemoryStore(memory_store(out, f"teacher-{conversation.conversation_id}"))
    try:
        rows = trace_conversation(conversation, llm, embedder, store, config)
    finally:
        if own:
            store.close()
    counts = write_shards(out, conversation.conversation_id, rows)
    ok = {op: sum(r["parse_ok"] for r in rows[op]) for op in rows}
    get_run_logger().info(
        "%s: %s", conversation.conversation_id,
        ", ".join(f"{op} {ok[op]}/{counts[op]} parsed" for op in counts),
    )
    return counts
