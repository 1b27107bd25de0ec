"""Weight quantization for inference: the student's base (`student.quantize`) and the teacher (`teacher.quantize`).

A CPU decode step reads every weight once, so its time is bound by memory bandwidth: int8 weights are a quarter
of float32's bytes. Only the base's linear layers are quantized; the experts stay float32 beside them, un-merged
(a merge would write into int8 weights), so a switch still only repoints the adapted layers and no float32 copy
of the base is kept. Training never sees this: experts train on the float32 base, and quantization is applied
where the trained result is loaded (evaluation, serving).

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
        from torch.ao.quantization import default_dynamic_qconfig, quantize_dynamic

        quantize_dynamic(model, {name: default_dynamic_qconfig for name in names}, dtype=torch.qint8, inplace=True)
    return len(names)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a linear layer runs on quantized weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, DynamicLinear)
