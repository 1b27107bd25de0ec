"""The memory system's control flow with scripted model outputs (the outputs a real teacher cannot be made to
write on demand: malformed JSON, invented ids), then with a real tiny model through the micro-batcher."""

from __future__ import annotations

import threading
from datetime import datetime

import pytest

from memlora.config import MemoryConfig
from memlora.data.records import Conversation, Question, Turn
from memlora.llm.batcher import MicroBatcher
from memlora.memory.llm import GenerationResult
from memlora.memory.store import MemoryStore
from memlora.memory.system import MemorySystem

T0 = datetime(2023, 5, 8, 13, 56)


class ScriptedLLM:
    """Answers each operation from a queue of canned texts; records the requests it saw, and in which batches."""

    model_id, backend_name = "scripted", "scripted"

    def __init__(self, outputs: dict[str, list[str]]):
        self.outputs = {k: list(v) for k, v in outputs.items()}
        self.requests = []
        self.batches: list[list[str]] = []  # each `generate` call's operations: the batches the system asked for

    def generate(self, requests):
        self.requests += requests
        self.batches.append([r.operation for r in requests])
        return [GenerationResult(self.outputs[r.operation].pop(0), 1, 1, 0.0, len(requests), r.constrained)
                for r in requests]


def conversation(n_turns=2) -> Conversation:
    turns = [Turn(1, i + 1, f"D1:{i + 1}", "Ann" if i % 2 == 0 else "Ben", f"line {i}", T0) for i in range(n_turns)]
    return Conversation("c1", turns, [Question(0, "What does Ann have?", "a cat", None, 4)])


def test_updates_apply_and_malformed_output_is_recorded_never_applied(embedder):
    llm = ScriptedLLM({
        "extraction": ['{"facts": ["Ann has a cat", "Ben bakes bread", "Ann lives in Oslo"]}'],
        "update": [
            '{"memory": [{"id": "0", "text": "Ann has a cat", "event": "ADD"}]}',
            '{"memory": [{"id": "0", "text": "Ben bakes", "event": "MODIFY"}]}',    # wrong event name
            '{"memory": [{"id": "7", "text": "Ann lives in Oslo", "event": "UPDATE"}]}',  # invented id
        ],
        "generation": ['Sure! {"answer": "a cat"} hope that helps'],
    })
    calls = []
    store = MemoryStore()
    system = MemorySystem(llm, store, embedder, MemoryConfig(window=2), on_call=calls.append)
    system.ingest(conversation())
    assert [m.text for m in store.all("c1")] == ["Ann has a cat"]
    update_calls = [c for c in calls if c.operation == "update"]
    assert [c.parsed.ok for c in update_calls] == [True, False, False]
    assert "MODIFY" in update_calls[1].parsed.error and "not shown" in update_calls[2].parsed.error
    assert [c.step for c in update_calls] == [0, 1, 2]
    assert system.answer("c1", conversation().questions) == ["a cat"]
    # every request was constrained to its schema; update ids are those of the prompt
    assert all(r.schema is not None for r in llm.requests)
    assert llm.requests[1].schema["properties"]["memory"]["items"]["properties"]["id"]["enum"] == ["0"]


def test_update_and_delete_reach_the_store(embedder):
    llm = ScriptedLLM({
        "extraction": ['{"facts": ["Ann has a cat"]}', '{"facts": ["Ann moved to Oslo"]}',
                       '{"facts": ["Ann gave her cat away"]}'],
        "update": [
            '{"memory": [{"id": "0", "text": "Ann has a cat", "event": "ADD"}]}',
            '{"memory": [{"id": "0", "text": "Ann has a cat and lives in Oslo", "event": "UPDATE", "old_memory": "x"}]}',
            '{"memory": [{"id": "0", "text": "Ann has a cat", "event": "DELETE"}]}',
        ],
    })
    store = MemoryStore()
    system = MemorySystem(llm, store, embedder, MemoryConfig(window=1))
    system.ingest(conversation(3))
    assert store.all("c1") == []
    assert [e for _, e, *_ in store.history("c1")] == ["ADD", "UPDATE", "DELETE"]


def test_compact_update_output_sends_its_own_prompt_and_schema_and_applies_without_text(embedder):
    """`update_output: compact`: the update call carries the compact template and schema (recorded under that
    template's hash), and id-only NONE / DELETE entries change the store as the full ones do."""
    from memlora.memory.prompts import COMPACT_UPDATE, TEMPLATES

    llm = ScriptedLLM({
        "extraction": ['{"facts": ["Ann has a cat"]}', '{"facts": ["Ann has a cat"]}',
                       '{"facts": ["Ann gave her cat away"]}'],
        "update": [
            '{"memory": [{"id": "0", "event": "ADD", "text": "Ann has a cat"}]}',
            '{"memory": [{"id": "0", "event": "NONE"}]}',
            '{"memory": [{"id": "0", "event": "DELETE"}]}',
        ],
    })
    calls, store = [], MemoryStore()
    MemorySystem(llm, store, embedder, MemoryConfig(window=1, update_output="compact"),
                 on_call=calls.append).ingest(conversation(3))
    updates = [r for r in llm.requests if r.operation == "update"]
    assert updates[0].messages[0]["content"] == COMPACT_UPDATE.system != TEMPLATES["update"].system
    kept = updates[1].schema["properties"]["memory"]["items"]["anyOf"][-1]
    assert kept["required"] == ["id", "event"] and "text" not in kept["properties"]
    assert {c.template_hash for c in calls if c.operation == "update"} == {COMPACT_UPDATE.hash}
    assert store.all("c1") == []
    assert [e for _, e, *_ in store.history("c1")] == ["ADD", "DELETE"]


def test_unconstrained_operation_sends_no_schema(embedder):
    config = MemoryConfig(operations={"extraction": {"constrained": False}})
    llm = ScriptedLLM({"extraction": ["no facts here"]})
    calls = []
    MemorySystem(llm, MemoryStore(), embedder, config, on_call=calls.append).ingest(conversation())
    assert llm.requests[0].schema is None
    assert not calls[0].parsed.ok and calls[0].result.constrained is False


@pytest.mark.timeout(300)
def test_micro_batcher_merges_threads_and_keeps_results(tiny_backend):
    from memlora.memory.llm import GenerationRequest
    from memlora.memory.prompts import TEMPLATES

    requests = [GenerationRequest("extraction", TEMPLATES["extraction"].messages(f"Ann: fact {i}"), 6)
                for i in range(6)]
    direct = [r.text for r in tiny_backend.generate(requests)]
    batcher = MicroBatcher(tiny_backend, max_batch=8, linger_s=0.2)
    got: dict[int, str] = {}
    sizes: list[int] = []

    def worker(i):
        result = batcher.generate([requests[i]])[0]
        got[i] = result.text
        sizes.append(result.batch_size)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    batcher.close()
    assert [got[i] for i in range(6)] == direct
    assert max(sizes) > 1  # calls from different threads shared a batch


def test_a_fact_unlike_every_memory_is_added_without_an_update_call(embedder):
    """memory.min_similarity: unrelated memories are not shown (a small model answers NONE to them and the
    new fact is lost); a fact with nothing similar is stored directly, a similar one still gets its call."""
    llm = ScriptedLLM({"update": ['{"memory": [{"id": "0", "text": "Ann has two cats", "event": "UPDATE", '
                                  '"old_memory": "Ann has a cat"}]}']})
    calls = []
    store = MemoryStore()
    system = MemorySystem(llm, store, embedder, MemoryConfig(min_similarity=0.5), on_call=calls.append)
    system.update("c1", 1, ["Ann has a cat"], T0)  # empty store: stored without a call
    system.update("c1", 1, ["The bakery on Pine Road opens at 6 am"], T0)  # unrelated: stored without a call
    assert calls == [] and len(store.all("c1")) == 2
    system.update("c1", 1, ["Ann has two cats"], T0)  # like "Ann has a cat": the model decides
    assert len(calls) == 1 and "Ann has a cat" in calls[0].request.messages[-1]["content"]
    assert "Pine Road" not in calls[0].request.messages[-1]["content"]
    assert sorted(m.text for m in store.all("c1")) == ["Ann has two cats", "The bakery on Pine Road opens at 6 am"]
    # min_similarity 0 (the code's default) keeps Mem0's way: every fact gets a call, top_k memories shown.
    plain_calls = []
    plain = MemorySystem(ScriptedLLM({"update": ['{"memory": [{"id": "0", "text": "x", "event": "ADD"}]}']}),
                         MemoryStore(), embedder, MemoryConfig(), on_call=plain_calls.append)
    plain.update("c1", 1, ["Ann has a cat"], T0)
    assert len(plain_calls) == 1


def test_every_session_is_extracted_in_one_batch_before_any_update(embedder):
    """Extraction reads only its window, so a conversation asks for all of it at once (full model batches);
    updates still follow the windows' order, and each call keeps its own session and step."""
    turns = [Turn(s, i + 1, f"D{s}:{i + 1}", "Ann" if i % 2 == 0 else "Ben", f"line {s}.{i}", T0)
             for s in (1, 2) for i in range(3)]
    llm = ScriptedLLM({
        "extraction": ['{"facts": ["Ann has a cat"]}', '{"facts": []}', '{"facts": ["Ann has a cat named Tom"]}',
                       '{"facts": []}'],
        "update": ['{"memory": [{"id": "0", "text": "Ann has a cat named Tom", "event": "UPDATE"}]}'],
    })
    calls, progress = [], []
    store = MemoryStore()
    system = MemorySystem(llm, store, embedder, MemoryConfig(window=2, min_similarity=0.5), on_call=calls.append)
    system.ingest(Conversation("c1", turns, []), after_session=lambda done, total: progress.append((done, total)))
    assert llm.batches == [["extraction"] * 4, ["update"]]
    extraction = [c for c in calls if c.operation == "extraction"]
    assert [(c.session, c.step) for c in extraction] == [(1, 0), (1, 1), (2, 2), (2, 3)]
    assert "line 2.0" in extraction[2].request.messages[-1]["content"]
    # the session-1 fact was stored (no similar memory: no call), then session 2's fact updated it
    update = [c for c in calls if c.operation == "update"]
    assert [(c.session, c.step) for c in update] == [(2, 0)]
    assert "Ann has a cat" in update[0].request.messages[-1]["content"]
    assert [m.text for m in store.all("c1")] == ["Ann has a cat named Tom"]
    assert progress == [(1, 2), (2, 2)]
