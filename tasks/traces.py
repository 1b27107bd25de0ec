"""Tasks of trace generation."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from tqdm.auto import tqdm

from memlora.config import Config
from memlora.data.records import Conversation
from memlora.layout import memory_store
from memlora.llm.backends import build_backend
from memlora.memory.embedder import Embedder
from memlora.memory.llm import LLMBackend
from memlora.memory.store import MemoryStore
from memlora.teacher.traces import TracesIncomplete, trace_conversation, trace_key, write_shards


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
    counts = write_shards(out, conversation.conversation_id, rows, trace_key(conversation, config))
    ok = {op: sum(r["parse_ok"] for r in rows[op]) for op in rows}
    get_run_logger().info(
        "%s: %s", conversation.conversation_id,
        ", ".join(f"{op} {ok[op]}/{counts[op]} parsed" for op in counts),
    )
    return counts


def raise_for_failures(conversations: list[Conversation], futures) -> None:
    """Wait for every conversation (a progress bar as they finish); if any failed, raise naming them all: the
    others' shards are written and kept, and a rerun traces only the missing ones."""
    failed = {}
    for conversation, future in tqdm(list(zip(conversations, futures)), desc="conversations traced", unit="conv"):
        try:
            future.result()
        except Exception as err:
            failed[conversation.conversation_id] = f"{type(err).__name__}: {err}"
    if failed:
        raise TracesIncomplete(
            f"no traces for {len(failed)} conversation(s): {', '.join(sorted(failed))} "
            f"(first error: {next(iter(failed.values()))}); rerun the same command to fill them in"
        )
