"""Normalize and validate input data into OUT/datasets/*.parquet."""

from __future__ import annotations

from pathlib import Path

from memlora.config import DataConfig
from memlora.data.io import read_parquet, write_parquet
from memlora.data.loaders import LoadOptions, load_corpus
from memlora.data.records import Conversation, from_tables, to_tables
from memlora.data.schemas import CONVERSATIONS, QUESTIONS
from memlora.data.split import assign_split
from memlora.layout import conversations_file, questions_file


def ingest(data_path: str | Path, out: str | Path, config: DataConfig) -> list[Conversation]:
    """Load `data_path`, split it, and write the normalized tables; nothing is written if it is invalid."""
    corpus = load_corpus(data_path, LoadOptions(config.max_turn_chars, config.on_long_turn))
    assign_split(corpus, config.split.test_ratio, config.split.seed, config.split.validation_ratio)
    conversations, questions = to_tables(corpus)
    write_parquet(conversations, conversations_file(out), "conversations")
    write_parquet(questions, questions_file(out), "questions")
    return corpus


def load_ingested(out: str | Path) -> list[Conversation]:
    return from_tables(
        read_parquet(conversations_file(out), "conversations", CONVERSATIONS),
        read_parquet(questions_file(out), "questions", QUESTIONS),
    )
