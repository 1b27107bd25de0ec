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
