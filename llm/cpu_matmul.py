"""Which product a CPU decode step's few rows take, chosen on the machine that runs it.

A decode step multiplies a few rows (one per sequence in the batch) by each weight. torch's `F.linear` (x @ W^T)
hands that to the BLAS, and how fast the BLAS is at such shapes depends on the CPU, not on us: on the AMD EPYC
host of 2026-12-04 MKL took a slow path, 47 ms for the bundled teacher's 49152 x 576 output head on 8 rows against
13 ms as (W @ x^T)^T ("rows first"), and multiplied a single row on one thread (so one row went as two copies of
itself: the float32 teacher's batch-1 step 66.4 -> 38.2 ms). On the Intel Xeon host of 2026-12-06 the same
rows-first product was the slow one: 2.7x `F.linear`'s time for a batch-1 step's products, 1.3x at 8 rows.
So the choice is measured once per process, on the model's own largest weight (`decode_product`), and only
rows-first is ever patched in; `MEMLORA_CPU_DECODE_PRODUCT=linear|rows_first` fixes it instead. The two agree to
float rounding (not to the bit: an answer decoded on a near tie can differ between them, as between machines).
Past ~256 rows (prefill, scoring) the two are on par, so larger inputs always keep `F.linear`; int8 linears
(fbgemm) are left alone.
"""

from __future__ import annotations

import logging
import os
import time
import types

import torch
import torch.nn.functional as F

ROWS_FIRST_MAX = 256
PRODUCT_ENV = "MEMLORA_CPU_DECODE_PRODUCT"
PRODUCTS = ("linear", "rows_first")
# Below this many weights a product is mostly call overhead (tiny test models): nothing to choose, keep torch's.
TIMED_MIN_NUMEL = 4 * 2**20
# Rows-first only where it is clearly faster: the hosts measured so far differ by 1.6-3.6x, noise by a few percent.
ROWS_FIRST_MARGIN = 1.2

log = logging.getLogger("memlora.llm")
_chosen: dict[tuple, str] = {}


def _rows_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    if rows == 0 or rows > ROWS_FIRST_MAX or not x.is_floating_point():
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:  # two rows took MKL's threaded product on the AMD host, one its single-thread one (see above)
        out = torch.matmul(weight, flat.repeat(2, 1).t()).t()[:1]
    else:
        out = torch.matmul(weight, flat.t()).t()
    if bias is not None:
        out = out + bias
    return out.contiguous().view(*x.shape[:-1], weight.shape[0])


def _rows_first_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _rows_first(x, self.weight, self.bias)


def _cpu_linears(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [m for m in model.modules()
            if type(m) is torch.nn.Linear and m.weight.device.type == "cpu" and m.weight.is_floating_point()]


def use_rows_first_linears(model: torch.nn.Module) -> int:
    """Route every plain `nn.Linear` of a CPU model through the rows-first product; returns how many.

    Inference only (the backends call it through `use_fastest_decode_product`): training keeps `F.linear`, whose
    backward autograd knows best."""
    linears = _cpu_linears(model)
    for module in linears:
        module.forward = types.MethodType(_rows_first_forward, module)
    return len(linears)


def _best_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm-up: pages and the BLAS's own set-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


@torch.inference_mode()
def time_products(weight: torch.Tensor, rows: tuple[int, ...] = (1, 8)) -> dict[str, float]:
    """Seconds for `F.linear` and rows-first on `weight`, summed over a decode step's row counts (best of 5)."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(n, weight.shape[1], generator=generator, dtype=weight.dtype) for n in rows]
    return {"linear": sum(_best_seconds(lambda x=x: F.linear(x, weight)) for x in inputs),
            "rows_first": sum(_best_seconds(lambda x=x: _rows_first(x, weight, None)) for x in inputs)}


def decode_product(model: torch.nn.Module) -> str:
    """`linear` or `rows_first`: the environment's choice, else the faster on this machine (measured once per
    process and weight shape on the model's largest float32 linear; `linear` where it is too small to tell)."""
    forced = os.environ.get(PRODUCT_ENV, "auto").strip().lower()
    if forced in PRODUCTS:
        return forced
    if forced != "auto":
        raise ValueError(f"{PRODUCT_ENV}={forced!r}: expected auto, {' or '.join(PRODUCTS)}")
    linears = _cpu_linears(model)
    if not linears:
        return "linear"
    weight = max((m.weight for m in linears), key=torch.Tensor.numel)
    if weight.numel() < TIMED_MIN_NUMEL:
        return "linear"
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads())
    if key not in _chosen:
        # Its first rows only (a view, 16 MB): they show the same gap, and the load does not page in
        # the whole output head (113 MB of the teacher's) before a decode step needs it.
        timed = weight.detach()[: max(1, TIMED_MIN_NUMEL // weight.shape[1])]
        seconds = time_products(timed)
        faster = seconds["rows_first"] * ROWS_FIRST_MARGIN < seconds["linear"]
        _chosen[key] = "rows_first" if faster else "linear"
        log.info("CPU decode product: %s (timed on %d x %d of the largest weight, rows 1 and 8: F.linear %.2f ms, "
                 "rows first %.2f ms)", _chosen[key], *timed.shape, seconds["linear"] * 1e3,
                 seconds["rows_first"] * 1e3)
    return _chosen[key]


def use_fastest_decode_product(model: torch.nn.Module) -> str:
    """Patch rows-first into a CPU model's linears where that is this machine's faster product; returns which."""
    product = decode_product(model)
    if product == "rows_first":
        use_rows_first_linears(model)
    return product
