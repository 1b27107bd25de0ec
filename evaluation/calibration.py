"""Deferral thresholds, calibrated per operation on held-out calls for a disagreement budget: of the answers the
expert keeps, at most `budget` may disagree with the teacher, and that must hold at the upper end of the 95 %
(Wilson) interval, not at the point estimate. Among the thresholds that meet it, the one that keeps the most
calls (defers the least). `served` then checks a threshold on calls calibration never saw."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from memlora.evaluation.stats import wilson

Pair = tuple[float, bool]  # (the expert's confidence in its answer, whether the answer agrees with the teacher)

# The trace rows' `backend` of calls serve-experts recorded: the teacher answered instead of an unsure expert
# (deferred), or after a sure one had answered (audited, `deferral.audit_share` of the kept calls).
# How the fallback teacher's answers are recorded: a call an expert deferred, one it kept and the teacher was also
# asked (audits), and one of an operation no expert serves yet (never filtered by an expert: all of it counts).
DEFERRED_BACKEND, AUDITED_BACKEND, NO_EXPERT_BACKEND = "deferred", "audited", "no-expert"
# trace rows of served traffic (`capture`'s and `serve-experts --fallback`'s): what `improve` learns from
SERVED_BACKENDS = frozenset({"capture", DEFERRED_BACKEND, AUDITED_BACKEND, NO_EXPERT_BACKEND})


def in_audit_sample(row: dict, share: float) -> bool:
    """Whether a recorded call belongs to the random sample of served traffic that calibrates the served experts.
    Audited calls were drawn at `share` among the kept ones; deferred calls are drawn at the same share here (a
    hash of the trace id), so kept and deferred calls enter with the same probability and the sample is not
    tilted towards the calls an expert was unsure of. Other rows (captured, traced) were never filtered by an
    expert: all of them count."""
    if row["backend"] != DEFERRED_BACKEND:
        return True
    return int(hashlib.sha256(row["trace_id"].encode()).hexdigest()[:8], 16) / 16**8 < share


class CalibrationError(ValueError):
    """Calibration cannot give a threshold that means anything (no calls, a budget outside (0, 1))."""


@dataclass(frozen=True)
class Threshold:
    """Keep an answer whose confidence is at least `value` (inf: defer every call); the rest go to the teacher."""

    value: float
    budget: float
    n: int               # calibration calls
    kept: int            # of them, kept by the expert
    disagree: int        # of the kept, disagreeing with the teacher
    upper: float         # Wilson 95 % upper bound of the kept answers' disagreement (nan: none kept)

    @property
    def keep_share(self) -> float:
        return self.kept / self.n if self.n else 0.0


@dataclass(frozen=True)
class Served:
    """What the served system did on a set of calls under one threshold (deferred calls get the teacher's
    answer, which agrees with the teacher by definition)."""

    n: int
    kept: int
    disagree: int                      # among the kept
    disagreement_ci: tuple[float, float]  # Wilson 95 % of the kept answers' disagreement

    @property
    def keep_share(self) -> float:
        return self.kept / self.n if self.n else 0.0

    @property
    def served_agreement(self) -> float:
        return 1 - self.disagree / self.n if self.n else math.nan


def calibrate(pairs: Sequence[Pair], budget: float, min_calls: int = 1) -> Threshold:
    """The threshold that keeps the most calls while the kept answers' disagreement stays within `budget` at
    its upper 95 % bound. Cuts fall only between distinct confidences (tied answers are kept or deferred
    together)."""
    if not 0 < budget < 1:
        raise CalibrationError(f"budget {budget}: must lie strictly between 0 and 1")
    if len(pairs) < max(1, min_calls):
        raise CalibrationError(f"{len(pairs)} held-out calls to calibrate on; at least {max(1, min_calls)} are "
                               "needed (capture or trace more calls, or raise the validation share)")
    best = Threshold(math.inf, budget, len(pairs), 0, 0, math.nan)
    for conf, kept, disagree in _cuts(pairs):
        upper = wilson(disagree, kept)[1]
        if upper <= budget:
            best = Threshold(conf, budget, len(pairs), kept, disagree, upper)
    return best


def budget_to_keep(pairs: Sequence[Pair], share: float) -> float:
    """The least budget at which `calibrate` would keep at least `share` of these calls (nan: no calls). What a
    user reads where calibration keeps nothing: how far the experts are from being served at all."""
    uppers = [wilson(disagree, kept)[1] for _, kept, disagree in _cuts(pairs) if kept >= share * len(pairs)]
    return min(uppers) if uppers else math.nan


def _cuts(pairs: Sequence[Pair]):
    """Where a threshold can fall, surest first: (confidence, calls kept, of them disagreeing) at each distinct
    confidence (tied answers are kept or deferred together)."""
    ranked = sorted(pairs, key=lambda p: -p[0])
    disagree = 0
    for k, (conf, agrees) in enumerate(ranked, start=1):
        disagree += not agrees
        if k < len(ranked) and ranked[k][0] == conf:
            continue  # the next call ties with this one: no cut here
        yield conf, k, disagree


def served(threshold: Threshold | float, pairs: Sequence[Pair]) -> Served:
    value = threshold.value if isinstance(threshold, Threshold) else threshold
    kept = [agrees for conf, agrees in pairs if conf >= value]
    disagree = sum(not a for a in kept)
    return Served(len(pairs), len(kept), disagree, wilson(disagree, len(kept)) if kept else (math.nan, math.nan))


def keep_curve(pairs: Sequence[Pair]) -> list[tuple[float, float, float]]:
    """(threshold, share of calls the expert keeps, agreement of what is served) at every cut: the report's
    curve, from keeping nothing (agreement 1) to keeping everything (the expert's own agreement)."""
    cuts = sorted({conf for conf, _ in pairs}, reverse=True)
    return [(cut, s.keep_share, s.served_agreement) for cut in [math.inf, *cuts] for s in [served(cut, pairs)]]


class DeferralPolicy:
    """What a server reads from `memlora calibrate`'s file: per operation, the threshold of ordinary answers
    (`keep`) and, for update, of destructive ones; an operation or class it has no threshold for is deferred."""

    def __init__(self, data: dict):
        self.data = data
        self.thresholds = {op: {name: float(t["value"]) for name, t in classes.items()}
                           for op, classes in data.get("operations", {}).items()}
        self.experts: dict[str, str] = dict(data.get("experts") or {})  # op -> sha256 of the weights calibrated
        self.stale: list[str] = []  # operations whose served expert is not the one calibrated (`for_experts`)

    def for_experts(self, digests: dict[str, str]) -> "DeferralPolicy":
        """The policy as it applies to the experts serving now (`digests`: op -> sha256 of its weights). A
        threshold holds its budget only for the expert it was fitted on: an operation calibrated for another
        expert (a `memlora distill` or a promotion since) loses its thresholds, so every answer of it is deferred
        (under --guard an unsure destructive one is demoted) until `memlora calibrate` runs again. A file that
        does not name its experts (written before 2026-12-07) applies as it is."""
        policy = DeferralPolicy(self.data)
        if policy.experts:
            policy.stale = sorted(op for op in policy.thresholds if op in digests
                                  and digests[op] != policy.experts.get(op))
            for op in policy.stale:
                del policy.thresholds[op]
        return policy

    @classmethod
    def read(cls, path: str | Path) -> "DeferralPolicy":
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"{path}: no deferral thresholds (run `memlora calibrate` first)")
        try:
            return cls(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError) as err:
            raise CalibrationError(f"{path}: not a thresholds file: {err}") from None

    def keeps(self, operation: str, confidence: float, destructive: bool = False) -> bool:
        value = self.thresholds.get(operation, {}).get("destructive" if destructive else "keep", math.inf)
        return confidence >= value

    def keeps_nothing(self, operation: str) -> bool:
        """No answer of `operation` is ever kept (every class's threshold is inf): its expert's answer could only
        be thrown away, so a server with a teacher need not ask the expert at all."""
        return all(value == math.inf for value in self.thresholds.get(operation, {}).values())
