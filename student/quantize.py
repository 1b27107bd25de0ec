"""Weight-only quantization of the student's base for inference (`student.quantize`), through torchao.

A CPU decode step reads every weight once, so its time is bound by memory bandwidth: int8 weights are a quarter
of float32's bytes. Only the base's linear layers are quantized; the experts stay float32 beside them, un-merged
(a merge would write into int8 weights), so a switch still only repoints the adapted layers and no float32 copy
of the base is kept. Training never sees this: experts train on the float32 base, and quantization is applied
where the trained result is loaded (evaluation, serving).

int4 is not offered: torchao 0.18's int4 weight-only kernels on a CPU need bfloat16 activations (slow on a CPU
without bfloat16 units) or the mslk package, which is not installable here.
"""

from __future__ import annotations

import logging

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
        raise ValueError(f"student.quantize: {scheme!r} is not one of {', '.join(SCHEMES)}")
    if scheme == "none":
        return 0
    # torchao logs a warning for each CUDA-only kernel library it cannot load on a CPU machine: noise here.
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    skip = _adapter_modules(model)
    chosen = [m for m in model.modules() if type(m) is torch.nn.Linear and id(m) not in skip]
    wanted = {id(m) for m in chosen}
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda module, fqn: id(module) in wanted)
    return len(chosen)


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is a quantized tensor (a torchao subclass) rather than a plain one."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return type(data) is not torch.Tensor
