"""Continuous batching (tracing's teacher): calls that join a running decode between steps, across operations,
decode exactly as they do alone; their callers get answers as each row ends; a failing call fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import pytest

from memlora.llm.batcher import MicroBatcher
from memlora.llm.continuous import ContinuousDecoder, continuous_decoder
from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema, generation_schema, update_schema
from memlora.memory.system import render_update


def mixed_requests() -> list[GenerationRequest]:
    """Every setting a row may have its own of: operation (prompt prefix), schema or none, cap, n-gram block,
    log-probs."""
    shown = [type("M", (), {"text": "Ann has a cat"})()]
    return [
        GenerationRequest("extraction", TEMPLATES["extraction"].messages("Ann: I adopted a cat named Tom."), 40,
                          extraction_schema(4, 160), no_repeat_ngram=8),
        GenerationRequest("update", TEMPLATES["update"].messages(render_update(shown, "Ann has two cats", "1")), 48,
                          update_schema(["0"], "1", 40)),
        GenerationRequest("generation", TEMPLATES["generation"].messages("Memories: none\nQuestion: Who is Tom?"),
                          12),
        GenerationRequest("extraction", TEMPLATES["extraction"].messages("Ben: ok"), 30, extraction_schema(4, 160),
                          no_repeat_ngram=8, logprobs_top_k=2),
        GenerationRequest("generation", TEMPLATES["generation"].messages("Memories: Ann has a cat\nQuestion: What "
                                                                         "pet does Ann have?"), 20,
                          generation_schema(100), logprobs_top_k=0),
        GenerationRequest("extraction", TEMPLATES["extraction"].messages("Eve: My sister lives in Paris and "
                                                                         "paints."), 6),
    ]


def alone(backend, requests):
    return [backend.generate([r])[0] for r in requests]


@pytest.mark.timeout(300)
def test_rows_joining_a_running_batch_decode_as_they_do_alone(tiny_backend):
    requests = mixed_requests()
    expected = alone(tiny_backend, requests)
    tiny_backend._prefixes.clear()  # the running batch computes the shared prompt heads itself
    decoder = ContinuousDecoder(tiny_backend, max_batch=8)
    futures = [Future() for _ in requests]
    items = list(zip(requests, futures))
    widths = []
    decoder.add(items[:2])
    for joining in (items[2:3], [], items[3:5], [], [], items[5:]):  # rows join at different steps
        if joining:
            decoder.add(joining)
        decoder.step()
        widths.append(decoder.batch.width)
    while len(decoder):
        decoder.step()
    got = [f.result(timeout=0) for f in futures]
    for request, want, result in zip(requests, expected, got):
        assert result.token_ids == want.token_ids, request.operation
        assert (result.text, result.finish_reason) == (want.text, want.finish_reason)
        if want.top_logprobs is None:
            assert result.top_logprobs is None
        else:
            assert [[t for t, _ in step] for step in result.top_logprobs] == \
                   [[t for t, _ in step] for step in want.top_logprobs]
            assert all(len(step) <= (request.logprobs_top_k or tiny_backend.logprobs_top_k)
                       for step in result.top_logprobs)
        assert result.extra == want.extra and result.prompt_tokens == want.prompt_tokens
    assert max(r.batch_size for r in got) > 1
    assert len({len(r.token_ids) for r in got}) > 1  # rows did end at different steps
    assert len(decoder) == 0 and decoder.batch.width == 0


@pytest.mark.timeout(300)
def test_conversations_share_the_running_batch_and_a_bad_call_fails_alone(tiny_backend):
    """Threads that each make calls one after another (as tracing's conversations do) through the batcher: each
    answer is the one the call gets alone, calls of different operations shared steps, and a call that cannot be
    decoded gets its own error while the calls decoding beside it are answered."""
    requests = mixed_requests()
    expected = [r.text for r in alone(tiny_backend, requests)]
    tiny_backend._prefixes.clear()
    decoder = continuous_decoder(tiny_backend, 4)
    assert decoder is not None
    batcher = MicroBatcher(tiny_backend, 4, decoder=decoder)
    got: dict[int, str] = {}
    sizes = []
    errors = []

    def conversation(indices):
        for i in indices:
            result = batcher.generate([requests[i]])[0]
            got[i] = result.text
            sizes.append(result.batch_size)

    def bad_call():
        try:
            batcher.generate([GenerationRequest("generation", [], 8)])  # no message: nothing to prefill
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=conversation, args=(ix,)) for ix in ([0, 3], [1, 5], [2, 4])]
    threads.append(threading.Thread(target=bad_call))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    batcher.close()
    assert [got[i] for i in range(len(requests))] == expected
    assert max(sizes) > 1
    assert len(errors) == 1


def test_a_backend_that_switches_adapters_per_batch_keeps_whole_batches(tiny_backend):
    """A subclass with its own `before_batch` (the student's expert switching) must not mix operations in a
    running batch: tracing falls back to merged batches for it, and for a backend that is not a local model."""
    from memlora.llm.hf_backend import TransformersBackend

    switching = type("Switching", (TransformersBackend,), {"before_batch": lambda self, operation: None})
    backend = object.__new__(switching)
    backend.model = tiny_backend.model
    assert tiny_backend.mixes_operations() and not backend.mixes_operations()
    assert continuous_decoder(backend, 4) is None
    assert continuous_decoder(object(), 4) is None
