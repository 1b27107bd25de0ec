"""The promotion gate of `improve`: a candidate expert replaces the current one only when, on the same held-out
calls, its agreement with the teacher is not worse beyond `improve.margin` at the lower end of the paired 95 %
interval (bootstrap over conversations: calls of one conversation are not independent), and it is better on
agreement or keeps more calls at the deferral budget (calibrated on the validation calls).

With fewer than `improve.min_clusters` conversations the cluster bootstrap can draw only a handful of distinct
samples and its interval comes out too narrow (the closed-loop bench's two test conversations gave +0.207
[0.167, 0.235]); there the interval is the wider of it and the per-call bootstrap's, and the decision says so."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from memlora.evaluation.calibration import CalibrationError, calibrate
from memlora.evaluation.deferral import Scored


@dataclass(frozen=True)
class Decision:
    operation: str
    promote: bool
    reason: str
    n: int                 # held-out calls compared on
    current: float         # agreement with the teacher
    candidate: float
    difference: float      # candidate - current
    ci_low: float
    ci_high: float
    current_keep: float    # share of validation calls kept at the budget
    candidate_keep: float

    def to_row(self) -> dict:
        return asdict(self)


def paired_difference(current: list[bool], candidate: list[bool], clusters: list[str], samples: int,
                      seed: int = 0, min_clusters: int = 1) -> tuple[float, float, float]:
    """mean(candidate) - mean(current), with a 95 % percentile interval resampling whole clusters; below
    `min_clusters` clusters, the wider of that and the interval resampling single calls."""
    if 0 < len(set(clusters)) < min_clusters:
        point, low, high = paired_difference(current, candidate, clusters, samples, seed)
        _, call_low, call_high = paired_difference(current, candidate, [str(i) for i in range(len(clusters))],
                                                   samples, seed)
        return point, float(np.fmin(low, call_low)), float(np.fmax(high, call_high))
    diff = np.asarray(candidate, dtype=float) - np.asarray(current, dtype=float)
    point = float(diff.mean()) if len(diff) else math.nan
    names = sorted(set(clusters))
    if len(names) < 2 or samples <= 0:
        return point, math.nan, math.nan
    by_cluster = [diff[[c == name for c in clusters]] for name in names]
    sums, counts = np.array([d.sum() for d in by_cluster]), np.array([len(d) for d in by_cluster])
    pick = np.random.default_rng(seed).integers(0, len(names), size=(samples, len(names)))
    draws = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def keep_share(scored: list[Scored], budget: float) -> float:
    try:
        return calibrate([(s.confidence, s.agrees) for s in scored if not s.destructive], budget).keep_share
    except CalibrationError:
        return 0.0


def decide(operation: str, current: list[Scored], candidate: list[Scored], clusters: list[str],
           current_val: list[Scored], candidate_val: list[Scored], *, margin: float, budget: float,
           samples: int, min_clusters: int = 1) -> Decision:
    """`current` and `candidate` score the same held-out calls in the same order (clustered by `clusters`)."""
    keeps = keep_share(current_val, budget), keep_share(candidate_val, budget)
    if not current:
        return Decision(operation, False, "no held-out calls to compare on (capture.test_ratio, or an evaluation's "
                        "test conversations)", 0, math.nan, math.nan, math.nan, math.nan, math.nan, *keeps)
    a, b = [s.agrees for s in current], [s.agrees for s in candidate]
    diff, low, high = paired_difference(a, b, clusters, samples, min_clusters=min_clusters)
    few = len(set(clusters)) < min_clusters
    note = f"; only {len(set(clusters))} held-out conversations: per-call interval where wider" if few else ""
    worse = (low if not math.isnan(low) else diff) < -margin
    better = diff > 0 or keeps[1] > keeps[0]
    if worse:
        reason = (f"may be worse than the current expert by more than the margin {margin} (agreement "
                  f"{diff:+.3f}, 95 % [{low:.3f}, {high:.3f}]: the lower end is below -{margin}){note}")
    elif not better:
        reason = f"not better on agreement ({diff:+.3f}) nor on calls kept ({keeps[1]:.2f} vs {keeps[0]:.2f})"
    else:
        reason = (f"agreement {diff:+.3f} (95 % [{low:.3f}, {high:.3f}]), calls kept {keeps[1]:.2f} vs "
                  f"{keeps[0]:.2f}{note}")
    return Decision(operation, not worse and better, reason, len(a), float(np.mean(a)), float(np.mean(b)), diff, low,
                    high, *keeps)
