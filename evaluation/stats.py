"""Confidence intervals: Wilson for proportions, percentile bootstrap for everything else."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Estimate:
    value: float
    n: int
    ci_low: float = math.nan
    ci_high: float = math.nan
    ci_method: str = "none"


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval: unlike the normal approximation it stays inside [0, 1] and is not empty at 0 or n."""
    if n <= 0:
        return math.nan, math.nan
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def proportion(flags: Sequence[bool | int | float]) -> Estimate:
    values = [float(f) for f in flags]
    n = len(values)
    if n == 0:
        return Estimate(math.nan, 0)
    low, high = wilson(sum(values), n)
    return Estimate(sum(values) / n, n, low, high, "wilson-95")


def bootstrap(values: Sequence, statistic: Callable[[np.ndarray], float] | None = None, *, samples: int = 1000,
              seed: int = 0) -> Estimate:
    """Percentile bootstrap 95% CI of `statistic` (default: the mean) over examples resampled with replacement.
    `values` may be a 1-d array of scores or any sequence the statistic indexes (rows of paired labels)."""
    arr = np.asarray(values, dtype=float) if statistic is None else np.asarray(values, dtype=object)
    n = len(arr)
    stat = statistic or (lambda a: float(np.mean(a)))
    if n == 0:
        return Estimate(math.nan, 0)
    point = float(stat(arr))
    if n < 2 or samples <= 0:
        return Estimate(point, n)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(samples, n))
    if statistic is None:
        draws = arr[index].mean(axis=1)
    else:
        draws = np.array([stat(arr[i]) for i in index], dtype=float)
    low, high = np.percentile(draws, [2.5, 97.5])
    return Estimate(point, n, float(low), float(high), "bootstrap-95")


def percentile(values: Sequence[float], q: float, *, samples: int = 1000, seed: int = 0) -> Estimate:
    """A percentile (linear interpolation, numpy's default) with a bootstrap CI."""
    arr = np.asarray(values, dtype=float)
    return bootstrap(arr, lambda a: float(np.percentile(a.astype(float), q)), samples=samples, seed=seed)
