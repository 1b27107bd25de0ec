"""In-memory records of a corpus, and their conversion to and from the Arrow tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import groupby

import pyarrow as pa

from memlora.data.schemas import CONVERSATIONS, QUESTIONS

NOT_MENTIONED = "Not mentioned in the conversation"  # the gold answer of a question about something never said

# Conversation ids become file names (trace shards, memory namespaces): keep them to a safe alphabet.
SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class Turn:
    session: int
    turn: int
    dia_id: str
    speaker: str
    text: str
    time: datetime
    image_caption: str | None = None


@dataclass(frozen=True)
class Question:
    question_id: int
    question: str
    answer: str | None
    adversarial_answer: str | None
    category: int
    evidence: tuple[str, ...] = ()

    @property
    def gold(self) -> str:
        """What a correct system says: category-5 questions ask about things never said."""
        return self.answer if self.answer is not None else NOT_MENTIONED


@dataclass
class Conversation:
    conversation_id: str
    turns: list[Turn]
    questions: list[Question] = field(default_factory=list)
    split: str = "train"

    def sessions(self) -> list[tuple[int, list[Turn]]]:
        return [(s, list(ts)) for s, ts in groupby(self.turns, key=lambda t: t.session)]


def first_sessions(conversation: Conversation, sessions: int) -> Conversation:
    """The conversation's first `sessions` sessions and only the questions whose evidence lies in them: the others
    cannot be answered from what a system read, and would teach an expert to answer from nothing."""
    turns = [t for _, ts in conversation.sessions()[:sessions] for t in ts]
    kept = {t.dia_id for t in turns}
    questions = [q for q in conversation.questions if q.evidence and set(q.evidence) <= kept]
    return replace(conversation, turns=turns, questions=questions)


def to_tables(corpus: list[Conversation]) -> tuple[pa.Table, pa.Table]:
    turns = [
        {
            "conversation_id": c.conversation_id,
            "split": c.split,
            "session": t.session,
            "turn": t.turn,
            "dia_id": t.dia_id,
            "speaker": t.speaker,
            "text": t.text,
            "time": t.time,
            "image_caption": t.image_caption,
        }
        for c in corpus
        for t in c.turns
    ]
    questions = [
        {
            "conversation_id": c.conversation_id,
            "split": c.split,
            "question_id": q.question_id,
            "question": q.question,
            "answer": q.answer,
            "adversarial_answer": q.adversarial_answer,
            "category": q.category,
            "evidence": list(q.evidence),
        }
        for c in corpus
        for q in c.questions
    ]
    return (
        pa.Table.from_pylist(turns, schema=CONVERSATIONS),
        pa.Table.from_pylist(questions, schema=QUESTIONS),
    )


def from_tables(conversations: pa.Table, questions: pa.Table) -> list[Conversation]:
    """Rebuild conversations from the normalized tables, keeping their order of first appearance."""
    by_id: dict[str, Conversation] = {}
    for row in conversations.to_pylist():
        conv = by_id.setdefault(row["conversation_id"], Conversation(row["conversation_id"], [], split=row["split"]))
        conv.turns.append(
            Turn(
                session=row["session"],
                turn=row["turn"],
                dia_id=row["dia_id"],
                speaker=row["speaker"],
                text=row["text"],
                time=row["time"],
                image_caption=row["image_caption"],
            )
        )
    for row in questions.to_pylist():
        conv = by_id.get(row["conversation_id"])
        if conv is None:
            continue
        conv.questions.append(
            Question(
                question_id=row["question_id"],
                question=row["question"],
                answer=row["answer"],
                adversarial_answer=row["adversarial_answer"],
                category=row["category"],
                evidence=tuple(row["evidence"] or ()),
            )
        )
    for conv in by_id.values():
        conv.turns.sort(key=lambda t: (t.session, t.turn))
    return list(by_id.values())
