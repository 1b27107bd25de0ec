"""Weight quantization for inference: the student's base (`student.quantize`) and the teacher (`teacher.quantize`).

A CPU decode step reads every weight once, so its time is bound by memory bandwidth: int8 weights are a quarter
of float32's bytes. Two designs for the experts, both without a float32 copy of the base:

- un-merged (`quantize_base`): only the base's linear layers are quantized; the experts stay float32 beside them,
  so a switch repoints the adapted layers. Each adapter runs its own small products beside its layer.
- merged (`quantize_merged`): every adapted layer is kept as one int8 copy per expert, each quantized from the
  base weight with that expert merged in, plus one of the base alone; a switch is one assignment that every such
  layer reads, and a step costs what the bare int8 base's costs.

Training never sees this: experts train on the float32 base, and quantization is applied where the trained
result is loaded (evaluation, serving).

Dynamic quantization rounds each call's activations per tensor, so one large channel sets the step for all of
them. The student has such channels (its down_proj inputs reach ~30,000x their mean), and plain int8 keeps
float32's top token at only about half of the positions of its own validation calls (`bench/int8_logits.py`).
Two remedies, both options: `smoothing` (SmoothQuant) moves each input channel's size into the weights, where
per-channel rounding absorbs it, exactly in float32; `keep` leaves the linears it names float32.

`int8` is PyTorch's own dynamic quantization (int8 weights per output channel, activations quantized per call,
fbgemm's int8 GEMM). Measured side by side on this project's 2-core CPU (a stack of the student's 576 x 1536
projections, 8 rows, torch 2.13): float32 5.8 ms, torch's dynamic int8 1.1 ms, torchao 0.18's int8 weight-only
8.0 ms and its int8 dynamic-activation config 8.7 ms (no fast CPU kernel for these shapes); torchao's int4
weight-only needs bfloat16 activations or the mslk package on a CPU. So torch's path it is, until torchao's CPU
kernels catch up. PyTorch marks torch.ao.quantization deprecated; it is there in the pinned torch 2.13.

`int8_weight` is weight-only: the same int8 weights per output channel, but the activations are not rounded to
int8 (they go in as bfloat16, torch's own `_weight_int8pack_mm` CPU kernel), so no outlier channel sets the step
for the others and neither smoothing nor float32 layers are needed: every linear, output head included, is int8.
Its speed depends on the CPU's bfloat16 units (AVX512-BF16 / AMX); on one without them the kernels still run,
slower (docs/results.md has it measured on a CPU with AVX512-BF16; measure on yours).

`int4_weight` is the same with 4-bit weights: 16 levels per group of `INT4_GROUP` inputs (asymmetric: a scale and
a zero per group), torch's own `_weight_int4pack_mm_for_cpu` kernel; about 0.6 bytes per weight. The bundled
teacher ships as a Q4_1 GGUF: every linear is already 16 levels per block of 32 inputs (a scale and a minimum
each), so groups of 32 put those weights back on their own grid, nearly exactly (the scale and zero rounded to
bfloat16), and the pruned student inherits them; its token embedding, the tied output head, ships as Q8_0 and
stays int8 here (int4 there is most of the error left: `bench/int8_logits.py`). A weight that moved off that grid
(an expert merged in) is rounded like any other. A layer the kernel's packing cannot take (outputs not a
multiple of `INT4_BLOCK`, inputs not of `INT4_GROUP`) is int8 weight-only instead.

Under both weight-only schemes the token embedding is held as int8 in blocks of `EMBED_BLOCK` inputs with one
scale each (`BlockInt8Embedding`) where that is exact: a Q8_0 embedding (the bundled teacher's and its pruned
student's) comes back to the same float32 values bit for bit, at a quarter of the bytes (113 -> 31 MB here). An
embedding not on such a grid stays float32: nothing is rounded that was not rounded already.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field

import torch

from memlora.llm.file_pages import model_tensors, release_file_pages, trim_heap
from memlora.llm.kv_cache import store_kv_as

WEIGHT_ONLY = "int8_weight"  # int8 weights, bfloat16 inputs (`Int8WeightLinear`)
INT4 = "int4_weight"  # 4-bit weights in groups, bfloat16 inputs (`Int4WeightLinear`)
SCHEMES = ("none", "int8", WEIGHT_ONLY, INT4)
SMOOTHABLE = ("int8",)  # schemes whose activations are rounded per tensor: the ones SmoothQuant's scales help
MERGE_LOSES = (INT4,)  # schemes whose experts stay beside the base: a merged weight leaves the shipped int4 grid


def applied_smoothing(scheme: str, alpha: float) -> float:
    """The smoothing strength `scheme` takes from `alpha`: none where its activations are not rounded to int8."""
    return alpha if scheme in SMOOTHABLE else 0.0


def _replace(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _adapter_modules(model: torch.nn.Module) -> set[int]:
    """ids of the modules that belong to an adapter (peft's `adapter_layer_names`: LoRA's lora_A/lora_B, ...)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ids = set()
    for layer in model.modules():
        if isinstance(layer, BaseTunerLayer):
            for attr in layer.adapter_layer_names:
                part = getattr(layer, attr, None)
                if isinstance(part, torch.nn.Module):
                    ids.update(id(m) for m in part.modules())
    return ids


def kept(name: str, keep: tuple[str, ...]) -> bool:
    """Whether linear `name` stays float32: a part of its name is one of `keep` (e.g. down_proj, lm_head; a merged
    layer's variants are named `<layer>.variants.<expert>`)."""
    return any(part in keep for part in name.split("."))


def quantize_base(model: torch.nn.Module, scheme: str, keep: tuple[str, ...] = ()) -> int:
    """Quantize the plain linear layers of `model` that are not part of an adapter and not `kept`, in place;
    returns how many."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return 0
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"quantize: {scheme} runs on a CPU kernel; this model is on "
                         f"{next(p.device for p in model.parameters() if p.device.type != 'cpu')} (set it to none)")
    skip = _adapter_modules(model)
    names = [name for name, m in model.named_modules()
             if type(m) is torch.nn.Linear and id(m) not in skip and not kept(name, keep)]
    if scheme in (WEIGHT_ONLY, INT4):
        for name in names:  # each layer's float32 pages handed back as soon as it is quantized
            linear = model.get_submodule(name)
            _replace(model, name, _quantized(scheme, linear.weight.detach(), linear.bias, name))
            release_file_pages([t for t in (linear.weight, linear.bias) if t is not None], model_tensors(model))
            del linear
        _embedding_in_blocks(model)
        # their inputs are bfloat16 already: the KV cache too, half the bytes held per token and read per step
        store_kv_as(model, torch.bfloat16)
        trim_heap()
        return len(names)
    floats = [t for n in names for t in (model.get_submodule(n).weight, model.get_submodule(n).bias) if t is not None]
    with warnings.catch_warnings():  # deprecated in favour of torchao, whose CPU kernels are slower here (above)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    release_file_pages(floats, model_tensors(model))
    return len(names)


def _embedding_in_blocks(model: torch.nn.Module) -> None:
    """Put the token embedding on block int8 where that is exact and frees its float32 weight (an output head
    left float32 still reads a tied one)."""
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if type(embedding) is not torch.nn.Embedding:
        return
    weight = embedding.weight
    if any(t.data_ptr() == weight.data_ptr() for m in model.modules() if m is not embedding
           for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))):
        return
    blocks = BlockInt8Embedding.exactly(weight.detach())
    if blocks is None:
        return
    model.set_input_embeddings(blocks)
    release_file_pages([weight], model_tensors(model))


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a linear layer runs on quantized weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, (DynamicLinear, Int8WeightLinear, Int4WeightLinear))


# Up to this many rows (a decode step's batch) `_weight_int8pack_mm`; more (a prefill), the weight dequantized to
# bfloat16 and one GEMM. Measured on the embedded default's 2-core CPU (AVX512-BF16), 20 of the student's
# projections, against float32: 1 row 0.63 vs 4.1 ms, 16 rows 4.6 vs 7.5 (dequantized 5.7), 32 rows 7.5 vs 10.7
# (dequantized 5.5), 512 rows 104 vs 83 (dequantized 50).
PACKED_ROWS = 16
# Rows of a weight rounded at a time: the output head's float32 temporaries, whole, were ~100 MB each and set the
# peak of loading a quantized student (1,300 MiB against 924 before quantizing, 2026-12-05).
CHUNK_ROWS = 4096


EMBED_BLOCK = 32  # inputs per scale of a block-int8 embedding: GGUF's Q8_0 block


class BlockInt8Embedding(torch.nn.Module):
    """A token embedding on int8 values with one float32 scale per block of `EMBED_BLOCK` inputs; a looked-up
    row is its int8 values times its blocks' scales, in float32."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = values.shape
        self.register_buffer("values", values.contiguous())
        self.register_buffer("scales", scales.contiguous())

    @classmethod
    def exactly(cls, weight: torch.Tensor) -> "BlockInt8Embedding | None":
        """The block-int8 form of `weight` if it gives back every float32 value exactly (a Q8_0 grid: each block's
        largest value is 127 steps), else None."""
        rows, dim = weight.shape
        if dim % EMBED_BLOCK:
            return None
        values = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(rows, dim // EMBED_BLOCK, dtype=torch.float32)
        with torch.no_grad():
            for start in range(0, rows, CHUNK_ROWS):  # float32 temporaries of a chunk at a time
                w = weight[start:start + CHUNK_ROWS].float().reshape(-1, dim // EMBED_BLOCK, EMBED_BLOCK)
                step = w.abs().amax(dim=-1) / 127
                q = torch.round(w / step.clamp(min=torch.finfo(torch.float32).tiny)[..., None])
                if q.abs().max() > 127 or not torch.equal(q * step[..., None], w):
                    return None
                values[start:start + CHUNK_ROWS] = q.reshape(-1, dim).to(torch.int8)
                scales[start:start + CHUNK_ROWS] = step
        return cls(values, scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.values[ids].float().unflatten(-1, (-1, EMBED_BLOCK))
        return (rows * self.scales[ids][..., None]).flatten(-2)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 in blocks of {EMBED_BLOCK}"


class Int8WeightLinear(torch.nn.Module):
    """A linear layer on int8 weights (symmetric, one scale per output channel) whose inputs are not rounded to
    int8: they are multiplied in bfloat16 (`PACKED_ROWS` says how) and the result is returned in the input's
    dtype."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int8WeightLinear":
        q = torch.empty(weight.shape, dtype=torch.int8)
        scales = torch.empty(weight.shape[0], dtype=torch.bfloat16)
        with torch.no_grad():
            for start in range(0, weight.shape[0], CHUNK_ROWS):  # a few float32 temporaries of a chunk at a time
                w = weight.detach()[start:start + CHUNK_ROWS].float()
                # rounded to the bfloat16 the kernel reads first: each weight within half a step of the scale used
                part = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)
                q[start:start + CHUNK_ROWS] = torch.round(w / part.float()[:, None]).clamp(-127, 127).to(torch.int8)
                scales[start:start + CHUNK_ROWS] = part
        return cls(q, scales, None if bias is None else bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= PACKED_ROWS:  # a decode step: the int8 kernel reads a quarter of float32's bytes
            y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        else:  # a prefill: many rows make it compute-bound, where a bfloat16 GEMM on the dequantized weight wins
            y = torch.nn.functional.linear(rows, self.weight.to(torch.bfloat16) * self.scales[:, None])
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights, bfloat16 inputs"


# Inputs per scale and zero: Q4_1's block (the kernel takes 32, 64, 128 or 256). Measured on the student's
# validation calls, every linear int4 but the output head: logit error 0.02 of float32's spread at 32 against
# 0.26 at 64 (off the shipped grid).
INT4_GROUP = 32
INT4_KEEPS_INT8 = ("lm_head",)  # the output head: Q8_0 as shipped; its rounding reaches every logit directly
INT4_BLOCK = 64  # output rows the CPU packing interleaves: row i and row i + 32 of a block share a byte


class Int4WeightLinear(torch.nn.Module):
    """A linear layer on 4-bit weights (per group of `INT4_GROUP` inputs: w = (q - 8) * scale + zero, q in 0..15)
    in torch's CPU packing, inputs multiplied in bfloat16: `_weight_int4pack_mm_for_cpu` for up to `PACKED_ROWS`
    rows, a bfloat16 GEMM on the weight unpacked for that call for more (as `Int8WeightLinear`)."""

    def __init__(self, packed: torch.Tensor, scales_zeros: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.register_buffer("packed", packed.contiguous())
        self.register_buffer("scales_zeros", scales_zeros.contiguous())  # [in / group, out, 2] bfloat16
        self.register_buffer("bias", bias)

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        return weight.shape[0] % INT4_BLOCK == 0 and weight.shape[1] % INT4_GROUP == 0

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> "Int4WeightLinear":
        rows, cols = weight.shape
        with torch.no_grad():
            w = weight.detach().float().reshape(rows, cols // INT4_GROUP, INT4_GROUP)
            low, high = w.amin(dim=2), w.amax(dim=2)
            # scale and zero rounded to the bfloat16 the kernel reads before the weights are rounded against them
            scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16).float()
            zero = (low + 8 * scale).to(torch.bfloat16).float()
            q = (torch.round((w - zero[..., None]) / scale[..., None]) + 8).clamp(0, 15).to(torch.int32)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(rows, cols), 1)
            scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).to(torch.bfloat16)
        return cls(packed, scales_zeros, None if bias is None else bias.detach().float().clone())

    def dequantized(self) -> torch.Tensor:
        """The bfloat16 weight [out, in] the kernel computes with (the packing undone: within each block of
        `INT4_BLOCK` rows, byte j of input k holds row j in its low nibble and row j + 32 in its high one)."""
        rows, cols, half = self.out_features, self.in_features, INT4_BLOCK // 2
        blocks = self.packed.reshape(rows // INT4_BLOCK, cols, half)
        q = torch.cat([blocks & 0xF, blocks >> 4], dim=2).permute(0, 2, 1).reshape(rows, cols // INT4_GROUP, INT4_GROUP)
        scale, zero = (self.scales_zeros[..., i].transpose(0, 1)[..., None] for i in (0, 1))
        return ((q.to(torch.bfloat16) - 8) * scale + zero).reshape(rows, cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if rows.shape[0] <= PACKED_ROWS:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, INT4_GROUP, self.scales_zeros)
        else:
            y = torch.nn.functional.linear(rows, self.dequantized())
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y + self.bias.to(x.dtype) if self.bias is not None else y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, 4-bit weights in groups of "
                f"{INT4_GROUP}, bfloat16 inputs")


BARE = "__bare__"  # the variant of an adapted layer without any expert


class SwitchedLinear(torch.nn.Module):
    """An adapted layer as int8 variants, one per expert (and the bare base); `state["active"]`, shared by every
    such layer of a model, says which one runs."""

    def __init__(self, variants: dict[str, torch.nn.Module], state: dict):
        super().__init__()
        self.variants = torch.nn.ModuleDict(variants)
        self.state = state

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.variants[self.state["active"]](x)


class BesideLinear(torch.nn.Module):
    """A quantized base layer with each expert beside it as one low-rank pair (x A^T) B^T, folded from the
    adapter at load; `state["active"]`, shared as `SwitchedLinear`'s, names the expert that runs (`BARE`: none).
    Two products per layer and step, where peft's DeLoRA layer takes about ten operations (it recomputes its
    norms and scales every call)."""

    def __init__(self, base: torch.nn.Module, pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], state: dict):
        super().__init__()
        self.base = base
        self.state = state
        for i, (name, (a, b)) in enumerate(pairs.items()):
            self.register_buffer(f"a{i}", a.contiguous())
            self.register_buffer(f"b{i}", b.contiguous())
        self.index = {name: (f"a{i}", f"b{i}") for i, name in enumerate(pairs)}

    @property
    def pair_numel(self) -> int:
        """Every expert's folded pair, counted as the adapters' parameters (they are buffers here)."""
        return sum(getattr(self, n).numel() for names in self.index.values() for n in names)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x)
        if self.state.get("rows") is not None:  # a running batch of several experts: each adds to its own rows
            return self._per_row(x, y, self.state["rows"])
        names = self.index.get(self.state["active"])
        if names is None:
            return y
        a, b = getattr(self, names[0]), getattr(self, names[1])
        xa = torch.nn.functional.linear(x.to(a.dtype), a)
        if y.dtype == a.dtype and y.is_contiguous() and not torch.is_grad_enabled():
            # y += (x A^T) B^T in one product, written into the base's fresh output: a decode step of the
            # embedded default's student spends ~1.7 ms on its 182 pairs so against ~2.4 ms as product + add
            flat = y.view(-1, y.shape[-1])
            torch.addmm(flat, xa.reshape(-1, xa.shape[-1]), b.t(), out=flat)
            return y
        return y + torch.nn.functional.linear(xa, b).to(y.dtype)

    def _per_row(self, x: torch.Tensor, y: torch.Tensor, rows: list[str]) -> torch.Tensor:
        """`rows`: each row's expert. Every expert's pair side by side, each row's product masked to its own
        expert's columns: three products per layer whatever the mix (S-LoRA and Punica gather per row instead,
        with kernels of their own). The zeros add nothing, so a row gets what its expert alone gives it."""
        a, bt, layout = self._stacked()
        masks = self.state["masks"]  # emptied for every new `rows`: one mask per layout and step, for every layer
        if layout not in masks:
            which = torch.tensor([layout[0].index(name) if name in layout[0] else -1 for name in rows])
            owner = torch.cat([torch.full((r,), i) for i, r in enumerate(layout[1])])
            masks[layout] = (which[:, None] == owner[None, :]).to(device=x.device, dtype=a.dtype)
        xa = torch.nn.functional.linear(x.to(a.dtype), a)
        xa.mul_(masks[layout].view(len(rows), *([1] * (xa.dim() - 2)), -1))
        if y.dtype == a.dtype and y.is_contiguous():
            flat = y.view(-1, y.shape[-1])
            torch.addmm(flat, xa.reshape(-1, xa.shape[-1]), bt, out=flat)
            return y
        return y + torch.nn.functional.linear(xa, bt.t()).to(y.dtype)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(every A stacked, every B^T stacked, (experts, their ranks)), made at the first mixed step only: a second
        copy of the pairs, which only a server mixing experts in one batch pays."""
        if getattr(self, "_stack", None) is None:
            names = tuple(self.index)
            pairs = [(getattr(self, self.index[n][0]), getattr(self, self.index[n][1])) for n in names]
            self._stack = (torch.cat([a for a, _ in pairs]), torch.cat([b.t() for _, b in pairs]).contiguous(),
                           (names, tuple(a.shape[0] for a, _ in pairs)))
        return self._stack


def low_rank_pair(layer, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`adapter`'s update of a peft layer as (A, B) with update = B A, or None for a method without one here.
    DeLoRA: A scaled by the base weight's input norms, B by lambda / r over the rows' and columns' norms (its own
    forward, computed once); LoRA: B by its scaling."""
    with torch.no_grad():
        if hasattr(layer, "delora_A") and adapter in layer.delora_A:
            a, b = layer.delora_A[adapter], layer.delora_B[adapter]
            scaling = (layer.delora_lambda[adapter] / layer.r[adapter]) / (
                torch.clamp(a.norm(dim=1), min=1e-4) * torch.clamp(b.norm(dim=0), min=1e-4))
            return (a * layer.delora_w_norm[adapter][None, :]).detach().clone(), (b * scaling[None, :]).detach().clone()
        if hasattr(layer, "lora_A") and adapter in layer.lora_A and not getattr(layer, "use_dora", {}).get(adapter):
            return (layer.lora_A[adapter].weight.detach().clone(),
                    (layer.lora_B[adapter].weight * layer.scaling[adapter]).detach().clone())
    return None


def fold_beside(model: torch.nn.Module, adapter_names: list[str]) -> dict | None:
    """Replace every adapter layer of a peft `model` (its base already quantized) by a `BesideLinear` with each
    adapter folded into a low-rank pair, and return the shared switch state; None, and nothing changed, where some
    layer's method has no such pair."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    pairs = [{adapter: low_rank_pair(layer, adapter) for adapter in adapter_names} for _, layer in layers]
    if not layers or any(p is None for per_layer in pairs for p in per_layer.values()):
        return None
    state = {"active": BARE}
    for (name, layer), per_layer in zip(layers, pairs):
        _replace(model, name, BesideLinear(layer.get_base_layer(), per_layer, state))
    trim_heap()
    return state


def _float32(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear.requires_grad_(False)


def _quantized(scheme: str, weight: torch.Tensor, bias: torch.Tensor | None, name: str = "") -> torch.nn.Module:
    if scheme == INT4 and Int4WeightLinear.fits(weight) and not kept(name, INT4_KEEPS_INT8):
        return Int4WeightLinear.from_float(weight, bias)
    if scheme in (WEIGHT_ONLY, INT4):  # int4's packing cannot take this shape: int8 weight-only
        return Int8WeightLinear.from_float(weight, bias)
    return _dynamic_int8(weight, bias)


def _dynamic_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear = _float32(weight, bias)
    linear.qconfig = per_channel_dynamic_qconfig
    return DynamicLinear.from_float(linear)


@dataclass
class Smoothing:
    """SmoothQuant's per-channel scales for one model (Xiao et al., ICML 2023): a linear's input column j is
    multiplied by s_j and the layer that makes that input divides its output j by s_j (an RMSNorm's weight, or
    up_proj's row for down_proj), so the float32 function is unchanged while the activations' outlier channels
    shrink before they are rounded to int8 per tensor. Keyed by module name."""

    columns: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> its input columns' scale
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # linear -> its output rows' scale (1 / s)
    norms: dict[str, torch.Tensor] = field(default_factory=dict)  # RMSNorm -> its weight's scale (1 / s)

    def weight(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` of linear `name` as the smoothed model has it (a new tensor; the argument is left alone)."""
        if name in self.columns:
            weight = weight * self.columns[name][None, :]
        if name in self.rows:
            weight = weight * self.rows[name][:, None]
        return weight

    def bias(self, name: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`bias` of linear `name` as the smoothed model has it: scaled with the output rows."""
        return bias * self.rows[name] if bias is not None and name in self.rows else bias


def _weight_of(module: torch.nn.Module) -> torch.Tensor:
    return module.get_base_layer().weight if hasattr(module, "get_base_layer") else module.weight


def smoothing(model: torch.nn.Module, calibration: list[torch.Tensor], alpha: float,
              keep: tuple[str, ...] = ()) -> Smoothing:
    """Scales for every Llama-style decoder layer of `model` (input_layernorm -> q/k/v, post_attention_layernorm
    -> gate/up, up -> down) from the largest input each channel sees on `calibration` (token id tensors, run with
    any adapters disabled) and the base weights: s = max|x|^alpha / max|w|^(1 - alpha). A group that feeds a
    linear named in `keep` is left as it is: a float32 layer needs no smoothing, and an expert left beside it must
    read the input it was trained on."""
    if not 0 < alpha < 1:
        raise ValueError(f"smoothing alpha {alpha} must lie in (0, 1)")
    groups = []  # (the producer: a norm or up_proj, [the linears that read its output])
    for name, module in model.named_modules():
        attn, mlp = getattr(module, "self_attn", None), getattr(module, "mlp", None)
        if not all(hasattr(module, n) for n in ("input_layernorm", "post_attention_layernorm")) or not all(
                hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj")) or not all(
                hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")):
            continue
        groups += [(f"{name}.input_layernorm", [f"{name}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")]),
                   (f"{name}.post_attention_layernorm", [f"{name}.mlp.{p}" for p in ("gate_proj", "up_proj")]),
                   (f"{name}.mlp.up_proj", [f"{name}.mlp.down_proj"])]
    if not groups:
        raise ValueError("int8 smoothing needs Llama-style decoder layers (input_layernorm, self_attn.q/k/v_proj, "
                         "post_attention_layernorm, mlp.gate/up/down_proj); set student.int8_smoothing: 0")
    groups = [(producer, consumers) for producer, consumers in groups if not any(kept(c, keep) for c in consumers)]
    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(dim=0).float()
            peaks[name] = torch.maximum(peaks[name], x) if name in peaks else x
        return hook

    handles = [model.get_submodule(consumers[0]).register_forward_pre_hook(record(consumers[0]))
               for _, consumers in groups]
    disable = getattr(model, "disable_adapter", None)
    try:
        with torch.no_grad(), (disable() if disable else contextlib.nullcontext()):
            for ids in calibration:
                model(input_ids=ids.reshape(1, -1))
    finally:
        for handle in handles:
            handle.remove()
    result = Smoothing()
    for producer, consumers in groups:
        w_peak = torch.stack([_weight_of(model.get_submodule(c)).detach().abs().amax(dim=0).float()
                              for c in consumers]).amax(dim=0)
        s = (peaks[consumers[0]].clamp(min=1e-5) ** alpha / w_peak.clamp(min=1e-5) ** (1 - alpha)).clamp(min=1e-5)
        for c in consumers:
            result.columns[c] = s
        (result.norms if producer.endswith("layernorm") else result.rows)[producer] = 1 / s
    return result


def smooth_in_place(model: torch.nn.Module, smooth: Smoothing) -> None:
    """Apply `smooth` to the norms and to the plain float32 linears it names (in a peft model: the layers no
    adapter targets); with every linear plain, the model computes the same function as before."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module) is torch.nn.Linear and (name in smooth.columns or name in smooth.rows):
                if module.bias is not None:
                    module.bias.copy_(smooth.bias(name, module.bias))
                module.weight.copy_(smooth.weight(name, module.weight))
        for name, scale in smooth.norms.items():
            model.get_submodule(name).weight.mul_(scale.to(model.get_submodule(name).weight.dtype))


def quantize_merged(model: torch.nn.Module, adapter_names: list[str], scheme: str,
                    smooth: Smoothing | None = None, keep: tuple[str, ...] = ()) -> dict:
    """Replace every adapter layer of a peft `model` by a `SwitchedLinear` of int8 variants (the base with each
    adapter merged in, and the base alone), quantize the other plain linears, and return the shared switch state
    (`state["active"] = name` selects an adapter, `BARE` none). Layer by layer, so the float32 weights of a layer
    are freed once its variants are built; afterwards no float32 copy of an adapted weight is left. `smooth`
    (from `smoothing`) is applied to each variant after merging, to the plain linears and to the norms. Layers
    named in `keep` (`kept`: those whose inputs int8 cannot carry) stay as they are, float32 with the adapters
    beside them un-merged: one copy of the base weight for every expert (a float32 variant per expert cost 4 x
    92 MB for down_proj on the 26-layer student); the caller switches their adapter as peft does."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    mergeable = [s for s in SCHEMES if s != "none" and s not in MERGE_LOSES]
    if scheme not in mergeable:
        raise ValueError(f"quantize_merged: {scheme!r} is not one of {', '.join(mergeable)}"
                         + (" (a merged weight leaves its grid: keep the experts beside, fold_beside)"
                            if scheme in MERGE_LOSES else ""))
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"quantize: {scheme} runs on a CPU kernel (set student.quantize: none)")
    smooth = smooth or Smoothing()
    state = {"active": BARE}
    names = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            if kept(name, keep):
                continue
            layer = model.get_submodule(name)
            base = layer.get_base_layer()
            original = base.weight.detach().clone()
            bias = smooth.bias(name, base.bias)
            variants = {BARE: _quantized(scheme, smooth.weight(name, original), bias)}
            for adapter in adapter_names:
                layer.merged_adapters = []
                layer.merge(adapter_names=[adapter])  # the method's own merge: exact for DeLoRA, LoRA and ETHER
                variants[adapter] = _quantized(scheme, smooth.weight(name, base.weight), bias)
                base.weight.copy_(original)
            _replace(model, name, SwitchedLinear(variants, state))
            release_file_pages([t for t in (base.weight, base.bias) if t is not None], model_tensors(model))
            del layer, base, original
    smooth_in_place(model, smooth)
    quantize_base(model, scheme, keep)  # the linears no adapter touches (the output head)
    trim_heap()
    return state
