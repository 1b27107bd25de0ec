"""Tasks of trace generation."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from memlora.config import Config
from memlora.data.records import Conversation
from memlora.memory.embedder import Embedder
from memlora.memory.llm import LLMBackend
from memlora.memory.store import MemoryStore
from memlora.teacher.traces import trace_conversation, write_shards


@task(name="trace-conversation", cache_policy=NONE, task_run_name="trace-{conversation.conversation_id}")
def trace_conversation_task(
    conversation: Conversation, llm: LLMBackend, embedder: Embedder, store: MemoryStore, config: Config, out: str
) -> dict[str, int]:
    rows = trace_conversation(conversation, llm, embedder, store, config)
    counts = write_shards(out, conversation.conversation_id, rows)
    ok = {op: sum(r["parse_ok"] for r in rows[op]) for op in rows}
    get_run_logger().info(
        "%s: %s", conversation.conversation_id,
        ", ".join(f"{op} {ok[op]}/{counts[op]} parsed" for op in counts),
    )
    return counts
