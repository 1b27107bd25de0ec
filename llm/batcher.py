"""Merge the model calls of conversations processed in parallel threads into shared batches.

Each conversation's memory run is sequential (an update depends on the store the previous one left), so the
batch a single conversation can offer is small. Running several conversations in threads and merging their
pending calls here keeps the model's batches full, the way a serving engine does, without changing any
conversation's own order of operations.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, TypeVar

from memlora.llm.continuous import ContinuousDecoder, continuous_decoder, joins_running_batch
from memlora.memory.llm import GenerationRequest, GenerationResult, LLMBackend, cancelled_result

T = TypeVar("T")


class MicroBatcher:
    """One worker thread takes whatever calls are waiting (up to `max_batch * 4`, lingering `linger_s` for more)
    and decodes them together; with a `decoder`, calls instead join one running batch between decode steps.
    A failure belongs to the call that caused it: when a merged batch fails, each of its calls is run again on
    its own, so only the failing one gets the error."""

    def __init__(self, inner: LLMBackend, max_batch: int, linger_s: float = 0.05,
                 decoder: ContinuousDecoder | None = None):
        """`decoder` (on `inner`, see `continuous_decoder`): calls join the running decode between steps and
        are answered the step they end, instead of merged batches decoded to their end."""
        self.inner, self.max_batch, self.linger_s = inner, max_batch, linger_s
        self.continuous = decoder
        self.model_id, self.backend_name = inner.model_id, inner.backend_name
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self.in_flight = 0  # calls the worker holds now (decoding, or about to)
        self.isolated_failures = 0
        self._worker = threading.Thread(target=self._run, name="memlora-batcher", daemon=True)
        self._worker.start()

    @property
    def waiting(self) -> int:
        return self._queue.qsize()

    def submit(self, request: GenerationRequest) -> Future:
        future: Future = Future()
        self._queue.put((request, future))
        return future

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        futures = [self.submit(request) for request in requests]
        return [f.result() for f in futures]

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=30)

    def _run(self) -> None:
        if self.continuous is not None:
            self._run_continuous(self.continuous)
            return
        while True:
            item = self._queue.get()
            if item is None:
                return
            pending = [item]
            deadline = time.monotonic() + self.linger_s
            while len(pending) < self.max_batch * 4:
                try:
                    nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                pending.append(nxt)
            self.in_flight = len(pending)
            try:
                self._answer(pending)
            finally:
                self.in_flight = 0

    def _run_continuous(self, decoder: ContinuousDecoder) -> None:
        closing = False
        while True:
            waiting = []
            if not len(decoder):
                item = None if closing else self._queue.get()  # nothing decoding: wait for a call
                if item is None:
                    return
                waiting.append(item)
            while not closing and len(waiting) < decoder.room:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                else:
                    waiting.append(item)
            for request, future in waiting:
                if request.cancelled:  # its caller left while it waited: never decoded
                    future.set_result(cancelled_result(request))
            waiting = [w for w in waiting if not w[0].cancelled]
            joining = [w for w in waiting if joins_running_batch(w[0])]
            alone = [w for w in waiting if not joins_running_batch(w[0])]
            if alone:
                self._answer(alone)
            self.in_flight = len(decoder) + len(joining)
            try:
                if joining:
                    decoder.add(joining)
                if len(decoder):
                    decoder.step()
            except BaseException:  # noqa: BLE001  (whatever one call raised must not reach the others)
                pending = {id(f): (r, f) for r, f in decoder.abandon() + joining if not f.done()}
                self._each_alone(list(pending.values()))
            finally:
                self.in_flight = len(decoder)

    def _answer(self, pending: list[tuple[GenerationRequest, Future]]) -> None:
        try:
            results = self.inner.generate([r for r, _ in pending])
        except BaseException as err:  # noqa: BLE001  (whatever one call raised must not reach the others)
            if len(pending) == 1:
                pending[0][1].set_exception(err)
            else:
                self._each_alone(pending)
            return
        for (_, future), result in zip(pending, results):
            future.set_result(result)

    def _each_alone(self, pending: list[tuple[GenerationRequest, Future]]) -> None:
        """A merged batch failed: each of its calls runs again on its own, so only the failing one gets the error."""
        self.isolated_failures += 1
        for request, future in pending:
            try:
                future.set_result(self.inner.generate([request])[0])
            except BaseException as own:  # noqa: BLE001
                future.set_exception(own)


def in_threads(jobs: list[Callable[[LLMBackend], T]], backend: LLMBackend, max_batch: int | None = None,
               running: bool = False) -> list[T]:
    """Run `jobs` (each given the LLM to call) at once, one thread each, their calls merged into shared batches
    of `backend` (with `running`, into one running batch where the backend can: `continuous_decoder`); results
    in job order. One job runs on the backend directly."""
    if len(jobs) <= 1:
        return [job(backend) for job in jobs]
    size = max_batch or getattr(backend, "batch_size", 16)
    batcher = MicroBatcher(backend, size, decoder=continuous_decoder(backend, size) if running else None)
    try:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(job, batcher) for job in jobs]
            return [f.result() for f in futures]
    finally:
        batcher.close()
