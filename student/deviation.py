"""How far an expert moves each weight it adapts: ||W_adapted - W||_F per layer, absolute and relative to
||W||_F. This is the quantity the thesis is about: ETHER bounds it by construction (a reflection changes a
weight by at most 2 ||W||), DeLoRA bounds it by lambda and the weight's column norms, LoRA does not bound it."""

from __future__ import annotations

import math

import torch
from peft.tuners.hra.layer import HRALayer
from peft.tuners.tuners_utils import BaseTunerLayer


def holds(layer: BaseTunerLayer, adapter: str) -> bool:
    return any(adapter in getattr(layer, name, {}) for name in layer.adapter_layer_names)


@torch.no_grad()
def weight_delta(layer: BaseTunerLayer, adapter: str) -> torch.Tensor:
    """W_adapted - W for one layer, whatever the method: LoRA and DeLoRA add a delta (peft's get_delta_weight,
    scaling and norms included); ETHER (peft's HRA) multiplies W by a reflection H, so the change is W (H - I)."""
    if isinstance(layer, HRALayer):
        weight = layer.get_base_layer().weight.float()
        return weight @ layer.get_delta_weight(adapter).float() - weight
    return layer.get_delta_weight(adapter).float()


def short_name(name: str) -> str:
    """`base_model.model.model.layers.3.mlp.up_proj` -> `layers.3.mlp.up_proj`."""
    return name[name.index("layers."):] if "layers." in name else name


@torch.no_grad()
def weight_deviation(model, adapter: str) -> dict:
    """Per adapted layer [||dW||_F, ||dW||_F / ||W||_F], and over all of them together."""
    layers, delta_sq, base_sq = {}, 0.0, 0.0
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or not holds(module, adapter):
            continue
        delta = weight_delta(module, adapter).norm().item()
        base = module.get_base_layer().weight.float().norm().item()
        layers[short_name(name)] = [round(delta, 6), round(delta / base, 6) if base else None]
        delta_sq, base_sq = delta_sq + delta ** 2, base_sq + base ** 2
    relative = [r for _, r in layers.values() if r is not None]
    return {
        "total": round(math.sqrt(delta_sq), 6),
        "total_relative": round(math.sqrt(delta_sq / base_sq), 6) if base_sq else None,
        "max_relative": round(max(relative), 6) if relative else None,
        "layers": layers,
    }
