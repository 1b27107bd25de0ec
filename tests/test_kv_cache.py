"""The reserved KV cache (`llm.kv_cache`): written in place, it must decode exactly what transformers'
concatenating `DynamicCache` decodes, through shared prefixes, rows leaving the batch and growth past its
reservation."""

import copy

import pytest
import torch

from memlora.memory.llm import GenerationRequest
from memlora.memory.prompts import TEMPLATES, extraction_schema

TEXTS = [
    "Conversation on 8 May 2023:\nAnn: I adopted a cat named Tom.\nBen: Nice, I bake bread.",
    "Conversation on 9 May 2023:\nAnn: Hi!",
    "Conversation on 1 June 2023:\nBen: I moved to Denver last week and started a new job as a nurse.",
    "Conversation on 3 June 2023:\nBen: ok",
]


def concatenating_cache(config, capacity, prefix=None, rows=1):
    """What the backend used before: `DynamicCache`, the prefix deep-copied and repeated."""
    from transformers import DynamicCache

    if prefix is None:
        return DynamicCache(config=config)
    cache = copy.deepcopy(prefix)
    cache.batch_repeat_interleave(rows)
    return cache


def answers(backend, requests):
    return [(r.token_ids, r.token_logprobs, r.top_logprobs, r.finish_reason) for r in backend.generate(requests)]


@pytest.mark.timeout(300)
def test_reserved_cache_decodes_token_for_token_what_dynamic_cache_decodes(tiny_backend, monkeypatch):
    import memlora.llm.kv_cache as kv_cache
    from memlora.llm.hf_backend import TransformersBackend

    plain = TransformersBackend(tiny_backend.model, tiny_backend.tokenizer, "tiny", batch_size=8,
                                logprobs_top_k=4, prefix_cache=False)
    assert isinstance(kv_cache.reserved_cache(tiny_backend.model.config, 8).layers[0], kv_cache.ReservedLayer)
    schema = extraction_schema(max_facts=2, max_chars=12)
    batches = [
        [GenerationRequest("extraction", TEMPLATES["extraction"].messages(t), 20) for t in TEXTS],
        [GenerationRequest("extraction", TEMPLATES["extraction"].messages(t), 40, schema) for t in TEXTS],
    ]
    reserved = [answers(b, r) for b in (tiny_backend, plain) for r in batches]
    monkeypatch.setattr(kv_cache, "reserved_cache", concatenating_cache)
    concatenated = [answers(b, r) for b in (tiny_backend, plain) for r in batches]
    assert reserved == concatenated
    finished = {len(tokens) for batch in reserved for tokens, *_ in batch}
    assert len(finished) > 1  # rows left the batch at different steps


def test_reserved_layer_matches_concatenation_through_growth_selection_and_crop():
    from transformers.cache_utils import DynamicLayer

    from memlora.llm.kv_cache import ReservedLayer

    torch.manual_seed(0)
    ours, theirs = ReservedLayer(capacity=3), DynamicLayer()
    for new in (2, 1, 2, 1):  # the third update runs past the reservation
        k, v = torch.randn(4, 2, new, 8), torch.randn(4, 2, new, 8)
        a, b = ours.update(k, v), theirs.update(k, v)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
    index = torch.tensor([3, 1])
    ours.batch_select_indices(index), theirs.batch_select_indices(index)
    ours.crop(-2), theirs.crop(-2)
    k, v = torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    a, b = ours.update(k, v), theirs.update(k, v)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and ours.get_seq_length() == 5


def test_a_prefix_fills_every_row_and_stays_unchanged():
    from transformers.cache_utils import DynamicLayer

    from memlora.llm.kv_cache import ReservedLayer

    prefix = DynamicLayer()
    keys, values = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    prefix.update(keys.clone(), values.clone())
    rows = ReservedLayer(capacity=9)
    rows.fill(prefix.keys, prefix.values, 3)
    out_k, _ = rows.update(torch.zeros(3, 2, 4, 8), torch.zeros(3, 2, 4, 8))
    assert out_k.shape == (3, 2, 9, 8) and rows._k.shape[-2] == 9  # filled to its reservation, no growth
    assert all(torch.equal(out_k[i, :, :5], keys[0]) for i in range(3))
    assert torch.equal(prefix.keys, keys) and torch.equal(prefix.values, values)
