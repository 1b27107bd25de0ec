"""Continuous batching of one model's calls: a call joins the running decode at the next step, and its caller
gets the answer the step it ends.

Tracing runs ten conversations at once, each one call after another (an update depends on the store the one
before left). With batches decoded to their end, a conversation whose call finished early waits for the
batch's longest row before it can send its next call, and the batch thins out to a row or two while the
others wait. Here the batch is refilled from the queue between steps, across operations, up to `max_batch` rows:
the teacher runs every row through the same weights, the student's experts beside its base each add their
update to their own rows (`ExpertBackend.mixes_operations`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from dataclasses import dataclass
from itertools import groupby
from typing import TYPE_CHECKING

from memlora.memory.llm import GenerationRequest

if TYPE_CHECKING:
    from memlora.llm.decoding import Decoded


def decodes_continuously(backend) -> bool:
    """Whether `backend`'s rows may share a batch whatever their operation (a local model with no adapter
    switched per batch, or the student with its experts folded beside the base)."""
    mixes = getattr(backend, "mixes_operations", None)
    return mixes is not None and mixes()


def continuous_decoder(backend, max_batch: int) -> "ContinuousDecoder | None":
    """A decoder for `backend` where `decodes_continuously(backend)`, else None."""
    return ContinuousDecoder(backend, max_batch) if decodes_continuously(backend) else None


def joins_running_batch(request: GenerationRequest) -> bool:
    """Greedy calls (the memory system's own): sampling settings belong to the whole batch."""
    return request.temperature <= 0


@dataclass
class _Row:
    request: GenerationRequest
    future: Future
    decoded: Decoded
    prompt_tokens: int
    batch_size: int       # rows in the batch right after it joined
    share_s: float = 0.0  # its share of the steps it was in: each step's time over the rows in it


class ContinuousDecoder:
    """Decodes calls as they come (`add`), one step at a time (`step`), on a `TransformersBackend` whose
    `mixes_operations()`."""

    def __init__(self, backend, max_batch: int):
        self.backend, self.max_batch = backend, max_batch
        self.batch = backend.running_batch()
        self.rows: list[_Row] = []  # in the batch's row order

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def room(self) -> int:
        return max(0, self.max_batch - len(self.rows))

    def add(self, items: list[tuple[GenerationRequest, Future]]) -> None:
        """Prefill `items` and put them in the running batch; calls of one operation that share their prompt's
        head (system prompt and examples) are prefilled together on the cached prefix (and on one expert)."""
        head = lambda item: (repr(item[0].messages[:-1]), item[0].operation)  # noqa: E731
        for _, group in groupby(sorted(items, key=head), key=head):
            group = list(group)
            requests = [r for r, _ in group]
            started = time.perf_counter()
            outs, counts = self.backend.join(self.batch, requests)
            share = (time.perf_counter() - started) / len(group)
            self.rows += [_Row(r, f, d, int(n), len(self.batch), share)
                          for (r, f), d, n in zip(group, outs, counts)]

    def step(self) -> None:
        """One token for every row; the rows that end get their answers."""
        started = time.perf_counter()
        left = self.backend.advance(self.batch)
        share = (time.perf_counter() - started) / len(self.rows)
        gone = {id(d) for d in left}
        done = [row for row in self.rows if id(row.decoded) in gone]
        self.rows = [row for row in self.rows if id(row.decoded) not in gone]
        for row in self.rows + done:
            row.share_s += share
        for row in done:
            row.future.set_result(self.backend.result(row.request, row.decoded, row.prompt_tokens, row.share_s,
                                                      row.batch_size))

    def abandon(self) -> list[tuple[GenerationRequest, Future]]:
        """After a failure: the calls still unanswered, and an empty batch to start again from."""
        pending = [(row.request, row.future) for row in self.rows]
        self.batch = self.backend.running_batch()
        self.rows = []
        return pending
