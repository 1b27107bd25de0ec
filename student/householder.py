"""ETHER's reflections applied to a layer's input instead of its weight.

peft's HRA layer builds the adapted weight W (I - 2 u u^T) as a full matrix on every forward: an identity of
the input's width, a product with the reflections, then a product with W. For the student's 1536-wide down
projections that is ~5 GFLOP per call, more than the layer itself costs on a training batch, and every forward
and backward pays it (an ETHER expert's 10 training steps had not finished after 6 minutes on 2 cores, where
DeLoRA's took 70 s). The same output is x (W H)^T = (x H) W^T with x H = x - 2 (x u) u^T: the reflections
applied to the input, a few multiply-adds per input value. `use_input_reflections` routes peft's HRA linear
layers through that; a merged or disabled layer, or one with Gram-Schmidt reflections (`apply_GS`), keeps
peft's own forward.
"""

from __future__ import annotations

import types

import torch


def _reflect(layer, x: torch.Tensor, active: list[str]) -> torch.Tensor:
    """x (H_1 ... H_r)^T for every active adapter, as peft's forward multiplies them: W' = W D_1 D_2 ..., so
    x W'^T = x ... D_2^T D_1^T W^T, and D^T = H_r ... H_1 (each reflection is symmetric)."""
    for name in reversed(active):
        u = layer.hra_u[name]
        u = (u / u.norm(dim=0)).to(x.dtype)
        for i in reversed(range(u.shape[1])):
            col = u[:, i]
            x = x - 2 * (x @ col).unsqueeze(-1) * col
    return x


def _input_reflection_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.hra_u]
    if self.disable_adapters or self.merged or not active or any(self.hra_apply_GS[a] for a in active):
        return type(self).forward(self, x, *args, **kwargs)
    previous_dtype = x.dtype
    x = x.to(self.get_base_layer().weight.dtype)
    return self.base_layer(_reflect(self, x, active), *args, **kwargs).to(previous_dtype)


def use_input_reflections(model: torch.nn.Module) -> int:
    """Route every peft HRA linear layer of `model` through the input-side product; returns how many."""
    from peft.tuners.hra.layer import HRALinear

    count = 0
    for module in model.modules():
        if isinstance(module, HRALinear):
            module.forward = types.MethodType(_input_reflection_forward, module)
            count += 1
    return count
