"""Deterministic train/validation/test split by conversation, so no test conversation ever reaches the
teacher's traces and no validation conversation is ever trained on."""

from __future__ import annotations

import hashlib
import math

from memlora.data.io import DataError
from memlora.data.records import Conversation

SPLITS = ("train", "validation", "test")
TRACED = ("train", "validation")  # the teacher plays these; experts train on `train` and stop on `validation`


def assign_split(corpus: list[Conversation], test_ratio: float, seed: int,
                 validation_ratio: float = 0.0) -> list[Conversation]:
    """Mark each conversation train, validation or test; the order of `corpus` does not change the outcome.

    Test conversations are drawn first and exactly as before validation existed, so turning validation on
    never moves a conversation into or out of the test split. At least one conversation always trains."""
    ranked = sorted(corpus, key=lambda c: hashlib.sha256(f"{seed}:{c.conversation_id}".encode()).hexdigest())
    n_test = math.ceil(len(corpus) * test_ratio) if test_ratio > 0 else 0
    n_test = min(n_test, len(corpus) - 1) if len(corpus) > 1 else 0
    rest = len(corpus) - n_test
    n_val = math.ceil(rest * validation_ratio) if validation_ratio > 0 else 0
    n_val = min(n_val, rest - 1) if rest > 1 else 0
    test_ids = {c.conversation_id for c in ranked[:n_test]}
    val_ids = {c.conversation_id for c in ranked[n_test : n_test + n_val]}
    for conv in corpus:
        cid = conv.conversation_id
        conv.split = "test" if cid in test_ids else "validation" if cid in val_ids else "train"
    return corpus


def require_test_conversation(corpus: list[Conversation], source: str) -> None:
    """The whole pipeline ends in an evaluation on test conversations: a corpus whose split holds none out is
    refused before the teacher and the training spend their time on it."""
    if not any(c.split == "test" for c in corpus):
        raise DataError(f"{source}: {len(corpus)} conversation(s), and the config's data.split holds none out for "
                        "the evaluation (a conversation always trains; a test share needs at least two); give more "
                        "conversations, or run `memlora traces` and `memlora distill` alone")


def assign_named_split(corpus: list[Conversation], ids: dict[str, list[str]], source: str) -> list[Conversation]:
    """Mark conversations by the split their id is named in (a benchmark's fixed protocol). Returns the named
    ones in corpus order; an id the data does not hold stops the run, naming it and the file."""
    split_of = {name: split for split, names in ids.items() for name in names}
    have = {c.conversation_id for c in corpus}
    missing = [name for name in split_of if name not in have]
    if missing:
        raise DataError(f"{source}: data.split.ids names conversation{'s' if len(missing) > 1 else ''} "
                        f"{', '.join(map(repr, missing))} that the data does not hold (it has: "
                        f"{', '.join(sorted(have)[:12])}{', ...' if len(have) > 12 else ''})")
    named = [c for c in corpus if c.conversation_id in split_of]
    for conv in named:
        conv.split = split_of[conv.conversation_id]
    return named


# Captured calls (`memlora capture`) have no ingested conversation: the proxy names the one they belong to, puts
# whole conversations (or blocks of calls) in the test share under the name with CAPTURED_TEST_SUFFIX, and holds
# out every `round(1 / validation_ratio)`-th other call per operation with CAPTURED_VALIDATION_SUFFIX.
CAPTURED_VALIDATION_SUFFIX = "-validation"
CAPTURED_TEST_SUFFIX = "-test"


def captured_split(conversation_id: str) -> str:
    if conversation_id.endswith(CAPTURED_TEST_SUFFIX):
        return "test"
    return "validation" if conversation_id.endswith(CAPTURED_VALIDATION_SUFFIX) else "train"


def held_for_test(name: str, ratio: float) -> bool:
    """Whether a captured conversation (or block of calls) belongs to the test share: a hash of its name, so
    every call of it lands on the same side, in any process, on any day."""
    return ratio > 0 and int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8 < ratio
