"""A KV cache layer that appends in place: a decode step writes its one new column into spare room.

transformers' `DynamicLayer` appends with `torch.cat`, which copies the whole cache every step of every layer.
On a 2-core CPU that copy is a large share of a step once the batch holds a few hundred prompt tokens a row:
SmolLM2-135M, 14 rows of 900 tokens, 174-188 ms a step with the copy against 133-135 ms without, the same tokens
(the teacher's own trace calls in fixed batches: 1.06x, `bench/kv_in_place.py`). Here `keys` / `values` are views
of a buffer with room after them; the buffer is copied only when the room runs out, when rows leave
(`batch_select_indices`, one copy of the kept rows), when a joining call's cache is merged in (`merge`, one
copy), or when something outside replaced the tensors (taken over on the next update).

A model whose linears already multiply in bfloat16 (the weight-only quantized schemes, `llm.quantize`) may keep
its cache in bfloat16 too (`store_kv_as`): half the bytes held per token and read per step; attention then runs
in the cache's dtype (`sdpa_kv_cast`).
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward


# Spare columns per reallocation: a copy every 32 steps instead of every step, and at most 32 columns of memory
# unused (16 rows of SmolLM2-135M: 24 MB over its 30 layers).
ROOM = 32


class InPlaceLayer(DynamicLayer):
    """`DynamicLayer` whose `keys` / `values` are `[start, end)` views of buffers with `room` spare columns."""

    def __init__(self, room: int = ROOM, dtype: torch.dtype | None = None):
        super().__init__()
        self.room, self.dtype_held = room, dtype  # None: the dtype the keys come in
        self._k = self._v = None   # the buffers
        self._views = (None, None)  # what `keys` / `values` were last set to here
        self._start = self._end = 0

    @classmethod
    def taking_over(cls, layer: DynamicLayer, room: int = ROOM, dtype: torch.dtype | None = None) -> "InPlaceLayer":
        """A layer with `layer`'s state (its tensors are copied into a buffer on the first update)."""
        new = cls(room, dtype)
        new.is_initialized = layer.is_initialized
        if layer.is_initialized:
            new.dtype, new.device = layer.dtype, layer.device
            new.keys, new.values = layer.keys, layer.values
        return new

    def _ours(self) -> bool:
        return self._k is not None and self.keys is self._views[0]

    def _publish(self) -> None:
        self._views = (self._k[:, :, self._start:self._end], self._v[:, :, self._start:self._end])
        self.keys, self.values = self._views

    def _fit(self, new_k: torch.Tensor, new_v: torch.Tensor) -> None:
        """New buffers holding the columns so far (none while `keys` is the empty initial tensor) with room for
        `new_k`'s and `room` more."""
        held = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        size = held + new_k.shape[-2] + self.room
        dtype = self.dtype_held or new_k.dtype
        self._k = new_k.new_empty(*new_k.shape[:2], size, new_k.shape[-1], dtype=dtype)
        self._v = new_v.new_empty(*new_v.shape[:2], size, new_v.shape[-1], dtype=dtype)
        if held:
            self._k[:, :, :held] = self.keys
            self._v[:, :, :held] = self.values
        self._start, self._end = 0, held

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        if not self._ours() or self._end + n > self._k.shape[-2]:
            self._fit(key_states, value_states)
        self._k[:, :, self._end:self._end + n] = key_states
        self._v[:, :, self._end:self._end + n] = value_states
        self._end += n
        self._publish()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self._ours():
            super().batch_select_indices(indices)
            return
        # one copy of the kept rows' columns (and the room after them)
        self._k, self._v = self._k[indices, :, self._start:], self._v[indices, :, self._start:]
        self._start, self._end = 0, self._end - self._start
        self._publish()


def drop_front(layer, n: int) -> None:
    """`layer` without its first `n` columns (no row attends to them any more): no copy for an `InPlaceLayer`."""
    if isinstance(layer, InPlaceLayer) and layer._ours():
        layer._start += n
        layer._publish()
    else:
        layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]


def merge(mine, theirs, pad_mine: int, pad_theirs: int) -> None:
    """`mine` := its rows then `theirs`, each left-padded with zeros to one width (`pad_*` columns), copied once
    into a buffer with room (a `torch.cat` of padded copies would copy `mine` twice, then again on its next
    update). Zeros, not garbage: masked columns still meet the values (0 x NaN is NaN)."""
    a_k, a_v, b_k, b_v = mine.keys, mine.values, theirs.keys, theirs.values
    width, na = a_k.shape[-2] + pad_mine, a_k.shape[0]
    room = mine.room if isinstance(mine, InPlaceLayer) else 0
    keys = a_k.new_empty(na + b_k.shape[0], a_k.shape[1], width + room, a_k.shape[-1])
    values = a_v.new_empty(na + b_v.shape[0], a_v.shape[1], width + room, a_v.shape[-1])
    for buffer, a, b in ((keys, a_k, b_k), (values, a_v, b_v)):
        buffer[:na, :, :pad_mine] = 0
        buffer[:na, :, pad_mine:width] = a
        buffer[na:, :, :pad_theirs] = 0
        buffer[na:, :, pad_theirs:width] = b
    if isinstance(mine, InPlaceLayer):
        mine._k, mine._v, mine._start, mine._end = keys, values, 0, width
        mine._publish()
    else:
        mine.keys, mine.values = keys, values


def in_place(cache, room: int = ROOM, dtype: torch.dtype | None = None):
    """`cache` (a transformers `DynamicCache`) with each plain `DynamicLayer` appending in place, holding `dtype`
    (None: the keys' own); other layer kinds (a sliding window keeps its own positions) stay as they are."""
    cache.layers = [InPlaceLayer.taking_over(layer, room, dtype) if type(layer) is DynamicLayer
                    else layer for layer in cache.layers]
    return cache


KV_CAST = "sdpa_kv_cast"  # the attention implementation `store_kv_as` sets


def sdpa_kv_cast(module, query, key, value, attention_mask, **kwargs):
    """transformers' sdpa attention over a cache held in another dtype than the model computes in: the query (and
    a float mask) cast to the cache's dtype, the output cast back."""
    if key.dtype == query.dtype:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.to(key.dtype)
    out, weights = sdpa_attention_forward(module, query.to(key.dtype), key, value, attention_mask, **kwargs)
    return out.to(query.dtype), weights


def store_kv_as(model, dtype: torch.dtype | None) -> bool:
    """Keep `model`'s KV cache in `dtype` (None: the keys' own, as transformers does) where its attention is sdpa
    (the decoders' `RunningBatch` reads `kv_dtype`); returns whether it will."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    if model.config._attn_implementation not in ("sdpa", KV_CAST):
        return False
    AttentionInterface.register(KV_CAST, sdpa_kv_cast)
    ALL_MASK_ATTENTION_FUNCTIONS.register(KV_CAST, sdpa_mask)
    model.config._attn_implementation = "sdpa" if dtype is None else KV_CAST
    model.memlora_kv_dtype = dtype
    return True


def kv_dtype(model) -> torch.dtype | None:
    """The dtype `store_kv_as` gave `model`'s cache, or None (the keys' own)."""
    return getattr(model, "memlora_kv_dtype", None)
