"""Normalize and validate input data into OUT/datasets/*.parquet."""

from __future__ import annotations

from pathlib import Path

from memlora.config import DataConfig
from memlora.data.io import read_parquet, write_parquet
from memlora.data.loaders import LoadOptions, load_corpus
from memlora.data.records import Conversation, first_sessions, from_tables, to_tables
from memlora.data.schemas import CONVERSATIONS, QUESTIONS
from memlora.data.split import assign_named_split, assign_split
from memlora.layout import conversations_file, questions_file


def prepare_corpus(data_path: str | Path, config: DataConfig) -> list[Conversation]:
    """`data_path` loaded, validated, split and cut as the config says: what ingest writes, nothing written."""
    corpus = load_corpus(data_path, LoadOptions(config.max_turn_chars, config.on_long_turn))
    if config.split.ids is not None:
        corpus = assign_named_split(corpus, config.split.ids, str(data_path))
    else:
        assign_split(corpus, config.split.test_ratio, config.split.seed, config.split.validation_ratio)
    if config.sessions_per_conversation:
        corpus = [first_sessions(c, config.sessions_per_conversation) for c in corpus]
    return corpus


def ingest(data_path: str | Path, out: str | Path, config: DataConfig) -> list[Conversation]:
    """Load `data_path`, split it, and write the normalized tables; nothing is written if it is invalid."""
    corpus = prepare_corpus(data_path, config)
    conversations, questions = to_tables(corpus)
    write_parquet(conversations, conversations_file(out), "conversations")
    write_parquet(questions, questions_file(out), "questions")
    return corpus


def load_ingested(out: str | Path) -> list[Conversation]:
    return from_tables(
        read_parquet(conversations_file(out), "conversations", CONVERSATIONS),
        read_parquet(questions_file(out), "questions", QUESTIONS),
    )
