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

`int8` is PyTorch's own dynamic quantization (int8 weights per output channel, activations quantized per call,
fbgemm's int8 GEMM). Measured side by side on this project's 2-core CPU (a stack of the student's 576 x 1536
projections, 8 rows, torch 2.13): float32 5.8 ms, torch's dynamic int8 1.1 ms, torchao 0.18's int8 weight-only
8.0 ms and its int8 dynamic-activation config 8.7 ms (no fast CPU kernel for these shapes); torchao's int4
weight-only needs bfloat16 activations or the mslk package on a CPU. So torch's path it is, until torchao's CPU
kernels catch up. PyTorch marks torch.ao.quantization deprecated; it is there in the pinned torch 2.13.
"""

from __future__ import annotations

import warnings

import torch

SCHEMES = ("none", "int8")


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


def quantize_base(model: torch.nn.Module, scheme: str) -> int:
    """Quantize the plain linear layers of `model` that are not part of an adapter, in place; returns how many."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return 0
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError(f"quantize: {scheme} is torch's dynamic quantization, a CPU kernel; this model is on "
                         f"{next(p.device for p in model.parameters() if p.device.type != 'cpu')} (set it to none)")
    skip = _adapter_modules(model)
    names = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear and id(m) not in skip]
    with warnings.catch_warnings():  # deprecated in favour of torchao, whose CPU kernels are slower here (above)
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {name: per_channel_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return len(names)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a linear layer runs on quantized weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)


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


def _dynamic_int8(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.nn.Module:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import per_channel_dynamic_qconfig

    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    linear.qconfig = per_channel_dynamic_qconfig
    return DynamicLinear.from_float(linear)


def quantize_merged(model: torch.nn.Module, adapter_names: list[str], scheme: str) -> dict:
    """Replace every adapter layer of a peft `model` by a `SwitchedLinear` of int8 variants (the base with each
    adapter merged in, and the base alone), quantize the other plain linears, and return the shared switch state
    (`state["active"] = name` selects an adapter, `BARE` none). Layer by layer, so the float32 weights of a layer
    are freed once its variants are built; afterwards no float32 copy of an adapted weight is left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if scheme != "int8":
        raise ValueError(f"quantize_merged: {scheme!r} (only int8 has a merged design)")
    if any(p.device.type != "cpu" for p in model.parameters()):
        raise ValueError("quantize: int8 is torch's dynamic quantization, a CPU kernel (set student.quantize: none)")
    state = {"active": BARE}
    names = [name for name, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in names:
            layer = model.get_submodule(name)
            base = layer.get_base_layer()
            original = base.weight.detach().clone()
            variants = {BARE: _dynamic_int8(original, base.bias)}
            for adapter in adapter_names:
                layer.merged_adapters = []
                layer.merge(adapter_names=[adapter])  # the method's own merge: exact for DeLoRA, LoRA and ETHER
                variants[adapter] = _dynamic_int8(base.weight, base.bias)
                base.weight.copy_(original)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, SwitchedLinear(variants, state))
            del layer, base, original
    quantize_base(model, scheme)  # the linears no adapter touches (the output head)
    return state
