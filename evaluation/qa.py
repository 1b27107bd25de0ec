"""End-to-end QA: a system builds its own memory from a test conversation, then answers the gold questions."""

from __future__ import annotations

import time
from typing import Callable

import pyarrow as pa

from memlora.config import Config, EvalConfig
from memlora.data.records import Conversation, Question
from memlora.evaluation.replay import CallRecorder, GroupingLLM
from memlora.llm.batcher import in_threads
from memlora.memory.embedder import Embedder
from memlora.memory.llm import LLMBackend
from memlora.memory.store import MemoryStore
from memlora.memory.system import MemorySystem

# LoCoMo's question categories (see the dataset's paper and ../shared/data/README.md).
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}

QA = pa.schema([
    pa.field("system", pa.string(), nullable=False),
    pa.field("conversation_id", pa.string(), nullable=False),
    pa.field("question_id", pa.int32(), nullable=False),
    pa.field("category", pa.int32(), nullable=False),
    pa.field("question", pa.string(), nullable=False),
    pa.field("gold", pa.string(), nullable=False),
    pa.field("answer", pa.string(), nullable=False),       # "" when the output did not parse
    pa.field("answered", pa.bool_(), nullable=False),      # the generation output parsed
    pa.field("memories", pa.int32(), nullable=False),      # memories in the system's store when it answered
])


def test_conversations(corpus: list[Conversation], evaluation: EvalConfig) -> list[Conversation]:
    """The held-out conversations (split `test`: never traced, never trained on), at most `max_conversations`."""
    test = [c for c in corpus if c.split == "test"]
    return test[: evaluation.max_conversations] if evaluation.max_conversations else test


def questions_of(conversation: Conversation, evaluation: EvalConfig) -> list[Question]:
    qs = conversation.questions
    return qs[: evaluation.max_questions] if evaluation.max_questions else list(qs)


def run_end_to_end(system: str, backend: LLMBackend, embedder: Embedder, store: MemoryStore, config: Config,
                   conversations: list[Conversation],
                   progress: Callable[[str], None] = lambda line: None) -> tuple[list[dict], list[dict]]:
    """Ingest each conversation into the system's own (cleared) memory namespace, then answer its questions.
    The conversations run at once, one thread each, their calls merged into shared batches (as tracing does:
    one conversation alone offers batches of a few calls), or joining one running batch
    (`evaluation.continuous_batching`). Returns (call rows, QA rows), conversation by conversation; `index`,
    `ref_index` and `group` number the calls and batches across all of them."""
    started = time.perf_counter()

    def one(k: int, conv: Conversation):
        def job(llm: LLMBackend) -> tuple[list[dict], list[dict], int]:
            grouping = GroupingLLM(llm)
            recorder = CallRecorder(system, grouping, config.memory)
            cid = conv.conversation_id
            store.clear(cid)
            memory = MemorySystem(grouping, store, embedder, config.memory, on_call=recorder)
            memory.ingest(conv, max_sessions=config.evaluation.max_sessions,
                          after_session=lambda done, total: progress(
                              f"{system}: end to end, conversation {k}/{len(conversations)} ({cid}), session "
                              f"{done}/{total}, {len(recorder.rows)} calls, {time.perf_counter() - started:.0f} s"))
            questions = questions_of(conv, config.evaluation)
            first = len(recorder.rows)
            answers = memory.answer(cid, questions)
            stored = len(store.all(cid))
            qa_rows = []
            # answer() makes exactly one generation call per question, in question order
            for question, answer, row in zip(questions, answers, recorder.rows[first:], strict=True):
                row["question_id"] = question.question_id
                qa_rows.append({
                    "system": system, "conversation_id": cid, "question_id": question.question_id,
                    "category": question.category, "question": question.question, "gold": question.gold,
                    "answer": answer, "answered": row["parse_ok"], "memories": stored,
                })
            return recorder.rows, qa_rows, grouping.group + 1
        return job

    parts = in_threads([one(k, conv) for k, conv in enumerate(conversations, 1)], backend,
                       running=config.evaluation.continuous_batching)
    rows: list[dict] = []
    qa_rows: list[dict] = []
    groups = 0
    for calls, answers, made in parts:
        offset = len(rows)
        rows += [{**row, "index": row["index"] + offset, "ref_index": row["ref_index"] + offset,
                  "group": row["group"] + groups} for row in calls]
        groups += made
        qa_rows += answers
    return rows, qa_rows
