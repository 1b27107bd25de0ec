"""The memory system: extraction, update and generation over a conversation, with any LLM backend.

Each model call is reported to `on_call` (trace recording, evaluation probes). Output that fails to parse is
reported like any other call and never applied to the store.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Callable

from memlora.config import MemoryConfig
from memlora.data.records import Conversation, Question, Turn
from memlora.memory.embedder import Embedder
from memlora.memory.llm import GenerationRequest, GenerationResult, LLMBackend
from memlora.memory.parsing import Parsed, parse_extraction, parse_generation, parse_update
from memlora.memory.prompts import extraction_schema, generation_schema, template, update_schema
from memlora.memory.store import Memory, MemoryStore


@dataclass
class CallRecord:
    operation: str
    conversation_id: str
    session: int
    step: int
    request: GenerationRequest
    result: GenerationResult
    parsed: Parsed
    template_hash: str


def _day(value: datetime | str) -> str:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return f"{value.day} {value.strftime('%B %Y')}"


def render_window(turns: list[Turn]) -> str:
    lines = [f"Conversation on {_day(turns[0].time)}:"]
    for t in turns:
        caption = f" [shares a photo: {t.image_caption}]" if t.image_caption else ""
        lines.append(f"{t.speaker}: {t.text}{caption}")
    return "\n".join(lines)


def render_update(shown: list[Memory], fact: str, new_id: str) -> str:
    memories = json.dumps([{"id": str(i), "text": m.text} for i, m in enumerate(shown)])
    return f"Existing memories:\n{memories}\nNew fact: {fact}\nNew id: {new_id}"


def render_question(memories: list[Memory], question: str) -> str:
    lines = [f"- [{_day(m.updated_at)}] {m.text}" for m in memories] or ["- (none)"]
    return "Memories:\n" + "\n".join(lines) + f"\nQuestion: {question}"


class MemorySystem:
    def __init__(
        self,
        llm: LLMBackend,
        store: MemoryStore,
        embedder: Embedder,
        config: MemoryConfig,
        on_call: Callable[[CallRecord], None] | None = None,
    ):
        self.llm, self.store, self.embedder, self.config = llm, store, embedder, config
        self.on_call = on_call or (lambda record: None)
        self._steps: dict[tuple[str, str], int] = defaultdict(int)

    # --- requests -----------------------------------------------------------------------------------------

    def _request(self, operation: str, user: str, schema: dict) -> GenerationRequest:
        op = self.config.operations[operation]
        return GenerationRequest(
            operation=operation,
            messages=template(operation, self.config.update_output).messages(user),
            max_new_tokens=op.max_new_tokens,
            schema=schema if op.constrained else None,
            no_repeat_ngram=op.no_repeat_ngram,
        )

    def _call(self, cid: str, session: int | list[int], requests: list[GenerationRequest], parse) -> list[Parsed]:
        """`session`: the session of every request, or one per request."""
        if not requests:
            return []
        sessions = session if isinstance(session, list) else [session] * len(requests)
        results = self.llm.generate(requests)
        parsed_all = []
        for i, (request, result) in enumerate(zip(requests, results)):
            parsed = parse(i, result.text)
            key = (cid, request.operation)
            self.on_call(
                CallRecord(
                    request.operation, cid, sessions[i], self._steps[key], request, result, parsed,
                    template(request.operation, self.config.update_output).hash,
                )
            )
            self._steps[key] += 1
            parsed_all.append(parsed)
        return parsed_all

    # --- operations ---------------------------------------------------------------------------------------

    def ingest(self, conversation: Conversation, max_sessions: int | None = None,
               after_session: Callable[[int, int], None] | None = None) -> None:
        """Extract facts from every window of every session in one batch, then update window by window, session
        by session. Extraction reads only its window, never the store, so asking for all of it at once changes no
        answer; it fills the model's batches, where session by session a conversation offered ~4 calls at a time
        (traces of the embedded default: batches of 9 on average out of 16). `after_session(done, total)` is
        called after each session's updates (progress)."""
        cid = conversation.conversation_id
        sessions = conversation.sessions()[:max_sessions]
        size = self.config.window
        # (session, its number from 1, window, the session's last window?)
        windows = [(session, number, turns[i : i + size], i + size >= len(turns))
                   for number, (session, turns) in enumerate(sessions, 1) for i in range(0, len(turns), size)]
        schema = extraction_schema(self.config.max_facts, self.config.fact_chars())
        extracted = self._call(cid, [session for session, *_ in windows],
                               [self._request("extraction", render_window(w), schema) for _, _, w, _ in windows],
                               lambda i, text: parse_extraction(text))
        for (session, number, window, last), parsed in zip(windows, extracted):
            if parsed.ok:
                facts = list(dict.fromkeys(parsed.value["facts"]))[: self.config.max_facts]
                self.update(cid, session, facts, window[0].time)
            if last and after_session is not None:  # the session's updates are all applied
                after_session(number, len(sessions))

    def update(self, cid: str, session: int, facts: list[str], at: datetime) -> None:
        """One update call per fact, batched against the store as it stands before this window."""
        if not facts:
            return
        vectors = self.embedder.encode(facts)
        floor = self.config.min_similarity
        shown_per_fact = [[m for m, score in self.store.search(cid, v, self.config.top_k) if score >= floor]
                          for v in vectors]
        requests, id_maps = [], []
        for fact, vector, shown in zip(facts, vectors, shown_per_fact):
            if not shown and floor > 0:
                # Nothing stored is like this fact: there is nothing to reconcile, so it is added without a
                # model call. (Shown unrelated memories, small models answer NONE and lose the fact.)
                self.store.add(cid, fact, vector, at.isoformat())
                continue
            ids = [str(i) for i in range(len(shown))]
            new_id = str(len(shown))
            schema = update_schema(ids, new_id, self.config.max_fact_chars, self.config.update_output == "compact")
            requests.append(self._request("update", render_update(shown, fact, new_id), schema))
            id_maps.append((ids, new_id, {str(i): m.id for i, m in enumerate(shown)}))
        parsed_all = self._call(
            cid, session, requests, lambda i, text: parse_update(text, id_maps[i][0], id_maps[i][1])
        )
        for parsed, (_, _, real_ids) in zip(parsed_all, id_maps):
            if parsed.ok:
                self._apply(cid, parsed.value["memory"], real_ids, at)

    def _apply(self, cid: str, entries: list[dict], real_ids: dict[str, str], at: datetime) -> None:
        for entry in entries:
            event, text = entry["event"], entry["text"]
            if event == "ADD" and text:
                self.store.add(cid, text, self.embedder.encode([text])[0], at.isoformat())
            elif event == "UPDATE" and text:
                self.store.update(cid, real_ids[entry["id"]], text, self.embedder.encode([text])[0], at.isoformat())
            elif event == "DELETE":
                self.store.delete(cid, real_ids[entry["id"]], at.isoformat())

    def answer(self, cid: str, questions: list[Question], session: int = -1) -> list[str]:
        """Answers in question order; an answer that failed to parse is the empty string."""
        if not questions:
            return []
        vectors = self.embedder.encode([q.question for q in questions])
        schema = generation_schema(self.config.answer_max_chars)
        requests = [
            self._request(
                "generation",
                render_question([m for m, _ in self.store.search(cid, v, self.config.top_k)], q.question),
                schema,
            )
            for q, v in zip(questions, vectors)
        ]
        parsed = self._call(cid, session, requests, lambda i, text: parse_generation(text))
        return [p.value["answer"] if p.ok else "" for p in parsed]
