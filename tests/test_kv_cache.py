"""The in-place KV cache layer holds exactly what transformers' DynamicLayer holds, through every way a running
batch changes it (appends past its room, rows leaving, columns trimmed, a merge replacing its tensors)."""

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from memlora.llm.kv_cache import InPlaceLayer, drop_front, merge

pytestmark = pytest.mark.timeout(60)


def _kv(batch: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, n, 8, generator=g), torch.randn(batch, 3, n, 8, generator=g)


def _same(ours: InPlaceLayer, stock: DynamicLayer) -> None:
    assert torch.equal(ours.keys, stock.keys) and torch.equal(ours.values, stock.values)
    assert ours.get_seq_length() == stock.get_seq_length()


def test_appends_in_place_and_matches_the_stock_layer_through_a_running_batchs_life():
    ours, stock = InPlaceLayer(room=4), DynamicLayer()
    k, v = _kv(5, 7, 0)  # the prefill
    for layer in (ours, stock):
        layer.update(k, v)
    _same(ours, stock)
    buffer = ours._k
    for step in range(4):  # within the room: the same buffer, written in place
        k, v = _kv(5, 1, 10 + step)
        for layer in (ours, stock):
            layer.update(k, v)
        _same(ours, stock)
    assert ours._k is buffer
    k, v = _kv(5, 1, 20)  # past the room: a new buffer
    for layer in (ours, stock):
        layer.update(k, v)
    _same(ours, stock)
    assert ours._k is not buffer

    keep = torch.tensor([0, 2, 3])  # rows leave
    for layer in (ours, stock):
        layer.batch_select_indices(keep)
    _same(ours, stock)
    for layer in (ours, stock):
        drop_front(layer, 3)  # columns no row attends to any more
    _same(ours, stock)
    k, v = _kv(3, 1, 30)
    for layer in (ours, stock):
        layer.update(k, v)
    _same(ours, stock)

    # A merge replaces the tensors from outside: the next update takes them over.
    other_k, other_v = _kv(2, ours.get_seq_length(), 40)
    for layer in (ours, stock):
        layer.keys, layer.values = torch.cat([layer.keys, other_k]), torch.cat([layer.values, other_v])
    for step in range(6):
        k, v = _kv(5, 1, 50 + step)
        for layer in (ours, stock):
            layer.update(k, v)
        _same(ours, stock)


def test_takes_over_a_filled_layer_such_as_a_copied_prefix_cache():
    stock = DynamicLayer()
    stock.update(*_kv(2, 5, 1))
    ours = InPlaceLayer.taking_over(stock)
    _same(ours, stock)
    k, v = _kv(2, 3, 2)
    for layer in (ours, stock):
        layer.update(k, v)
    _same(ours, stock)


def test_merge_left_pads_both_sides_with_zeros_in_one_buffer_that_then_appends_in_place():
    mine, stock = InPlaceLayer(room=2), DynamicLayer()
    for layer in (mine, stock):
        layer.update(*_kv(2, 6, 3))
    theirs = InPlaceLayer()
    theirs.update(*_kv(3, 9, 4))
    merge(mine, theirs, 3, 0)  # mine is 3 columns shorter

    def padded(t, n):
        return torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[-1]), t], dim=2)

    stock.keys = torch.cat([padded(stock.keys, 3), theirs.keys])
    stock.values = torch.cat([padded(stock.values, 3), theirs.values])
    _same(mine, stock)
    buffer = mine._k
    for step in range(2):
        k, v = _kv(5, 1, 60 + step)
        for layer in (mine, stock):
            layer.update(k, v)
        _same(mine, stock)
    assert mine._k is buffer  # the merge left room: no copy since


def test_a_bfloat16_layer_holds_the_stock_layers_values_rounded_through_every_change():
    ours, stock = InPlaceLayer(room=2, dtype=torch.bfloat16), DynamicLayer()

    def same():
        assert ours.keys.dtype == torch.bfloat16
        assert torch.equal(ours.keys, stock.keys.bfloat16()) and torch.equal(ours.values, stock.values.bfloat16())

    for layer in (ours, stock):
        layer.update(*_kv(4, 5, 5))
    same()
    for step in range(4):  # within and past the room
        k, v = _kv(4, 1, 70 + step)
        for layer in (ours, stock):
            layer.update(k, v)
        same()
    for layer in (ours, stock):
        layer.batch_select_indices(torch.tensor([1, 3]))
        drop_front(layer, 2)
    same()
    theirs = InPlaceLayer(dtype=torch.bfloat16)
    k, v = _kv(1, ours.get_seq_length(), 80)
    theirs.update(k, v)
    merge(ours, theirs, 0, 0)
    stock.keys, stock.values = torch.cat([stock.keys, k]), torch.cat([stock.values, v])
    same()
    taken = InPlaceLayer.taking_over(stock, dtype=torch.bfloat16)  # a float32 prefix cache taken over
    k, v = _kv(3, 1, 90)
    for layer in (taken, stock):
        layer.update(k, v)
    assert taken.keys.dtype == torch.bfloat16 and torch.equal(taken.keys, stock.keys.bfloat16())


@pytest.mark.timeout(120)
def test_a_model_keeps_its_cache_in_bfloat16_and_decodes_as_float32_does_within_its_rounding(tiny_model_dir):
    """The weight-only schemes (`int8_weight`, `int4_weight`) multiply in bfloat16 already and keep their KV cache
    in it too (`store_kv_as`). On float32 weights the only difference left is the cache's and the attention's
    rounding (relative 2^-9 per value): the next-token logits stay within 2 % of their spread at the worst entry
    (measured here: 0.8 %), and switching back gives float32's logits bit for bit."""
    from memlora.llm.decoding import RunningBatch, RowSpec
    from memlora.llm.hf_backend import TransformersBackend, load_causal_lm
    from memlora.llm.kv_cache import KV_CAST, kv_dtype, store_kv_as
    from memlora.llm.quantize import quantize_base

    model, tok, model_id = load_causal_lm(str(tiny_model_dir), device="cpu")
    ids = torch.randint(10, 400, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # a left-padded row: the mask reaches the attention

    def logits_after(steps: int) -> tuple[torch.Tensor, torch.dtype]:
        batch = RunningBatch(model, stop_ids=set())
        batch.add(ids, mask, [RowSpec(steps + 1, None, 0, 0, None, None)] * 3)
        for _ in range(steps):
            batch.step()
        return batch.logits, batch.cache.layers[0].keys.dtype

    want, dtype = logits_after(4)
    assert dtype == torch.float32 and kv_dtype(model) is None
    assert store_kv_as(model, torch.bfloat16) and model.config._attn_implementation == KV_CAST
    got, dtype = logits_after(4)
    assert dtype == torch.bfloat16
    assert (got - want).abs().max() < 0.02 * want.std(), ((got - want).abs().max() / want.std())
    store_kv_as(model, None)
    assert torch.equal(logits_after(4)[0], want)

    quantize_base(model, "int4_weight")  # the scheme sets it; its backend's prefix cache holds it too
    assert kv_dtype(model) == torch.bfloat16
    backend = TransformersBackend(model, tok, model_id)
    from memlora.memory.llm import GenerationRequest

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hi there"}]
    assert backend.generate([GenerationRequest("generation", messages, 4)])[0].text is not None
    (_, prefix), = backend._prefixes.values()
    assert prefix.layers[0].keys.dtype == torch.bfloat16
    eager, _, _ = load_causal_lm(str(tiny_model_dir), device="cpu")
    eager.config._attn_implementation = "eager"  # only sdpa is wrapped: anything else keeps its cache as it is
    assert not store_kv_as(eager, torch.bfloat16) and kv_dtype(eager) is None
