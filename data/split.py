"""Deterministic train/test split by conversation, so no test conversation ever reaches the teacher's traces."""

from __future__ import annotations

import hashlib
import math

from memlora.data.records import Conversation


def assign_split(corpus: list[Conversation], test_ratio: float, seed: int) -> list[Conversation]:
    """Mark each conversation train or test; the order of `corpus` does not change the outcome."""
    ranked = sorted(corpus, key=lambda c: hashlib.sha256(f"{seed}:{c.conversation_id}".encode()).hexdigest())
    n_test = math.ceil(len(corpus) * test_ratio) if test_ratio > 0 else 0
    if len(corpus) > 1:
        n_test = min(n_test, len(corpus) - 1)  # always leave something to train on
    else:
        n_test = 0
    test_ids = {c.conversation_id for c in ranked[:n_test]}
    for conv in corpus:
        conv.split = "test" if conv.conversation_id in test_ids else "train"
    return corpus
