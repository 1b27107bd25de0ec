"""Faster small-batch linear layers for CPU decoding.

A decode step multiplies a few rows (one per sequence in the batch) by each weight. Through `F.linear` (x @ W^T),
this machine's MKL takes a slow path for such shapes: the 49152 x 576 output head of the bundled teacher took
47 ms for 8 rows against 13 ms as (W @ x^T)^T, and the decoder's projections 1.2-2.7x longer at 4-16 rows
(2 cores, torch 2.13 CPU; the two agree to float rounding). Past ~256 rows (prefill, scoring) the two are on
par, so larger inputs keep `F.linear`.

One row is the worst case: MKL multiplies a matrix by a single vector on one thread, it seems, at about 9 GB/s
here, against 18-19 GB/s for the same weights times two rows (the student's 182 decoder linears + output head,
481 MB of float32, cold: 51 ms for one row, 25 ms for that row written twice). So a single row is multiplied
as two copies of itself and the first is kept: the float32 teacher's decode step at batch 1 took 66.4 ms
through `F.linear` and 38.2 ms so (`bench/bandwidth_floor.py`, side by side, 2026-12-04). int8 linears (fbgemm)
do not have this gap and are left alone.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

ROWS_FIRST_MAX = 256


def _rows_first_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 0 or rows > ROWS_FIRST_MAX or not x.is_floating_point():
        return F.linear(x, self.weight, self.bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # two rows take MKL's threaded product, one its single-thread one (see above)
        out = torch.matmul(self.weight, flat.repeat(2, 1).t()).t()[:1]
    else:
        out = torch.matmul(self.weight, flat.t()).t()
    if self.bias is not None:
        out = out + self.bias
    return out.contiguous().view(*x.shape[:-1], self.weight.shape[0])


def use_rows_first_linears(model: torch.nn.Module) -> int:
    """Route every plain `nn.Linear` of a CPU model through the rows-first product; returns how many.

    Inference only (the backends call it): training keeps `F.linear`, whose backward autograd knows best."""
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.device.type == "cpu":
            module.forward = types.MethodType(_rows_first_forward, module)
            count += 1
    return count
