"""Agreement with the teacher on the teacher's own test-set requests (teacher-forced): each system answered the
very requests the teacher answered, and is scored against the teacher's parsed output.

Calls whose teacher output did not parse have no reference and are left out of agreement (not of validity).
A system output that did not parse is what the memory system would drop: it scores 0 on every agreement metric.
"""

from __future__ import annotations

import json

from memlora.evaluation import scoring
from memlora.evaluation.stats import Estimate, bootstrap, proportion
from memlora.memory.prompts import EVENTS

INVALID = "INVALID"  # the update "event" of an output that did not parse

# The headline agreement metric of each operation (the report's bar chart).
# Update is judged by macro-F1, not accuracy: the teacher says NONE to most facts, so a model that always says
# NONE scores a high accuracy (reported next to it as the majority-class baseline).
PRIMARY = {"extraction": "fact_f1", "update": "event_macro_f1", "generation": "answer_token_f1"}


def _value(row: dict) -> dict | None:
    return json.loads(row["parsed_output"]) if row["parse_ok"] and row["parsed_output"] else None


def pairs(rows: list[dict], reference: dict[int, dict], operation: str) -> list[tuple[dict | None, dict]]:
    """(system's parsed output or None, teacher's parsed output) for the calls the teacher's output parsed."""
    out = []
    for row in rows:
        if row["operation"] != operation:
            continue
        ref = _value(reference[row["ref_index"]])
        if ref is not None:
            out.append((_value(row), ref))
    return out


def event_of(value: dict | None) -> str:
    """The decision of an update output: the event of its first entry (constrained output holds at least one)."""
    if not value or not value.get("memory"):
        return INVALID
    return value["memory"][0]["event"]


def score(operation: str, rows: list[dict], reference: dict[int, dict], threshold: float, samples: int,
          seed: int = 0) -> dict[str, Estimate]:
    ps = pairs(rows, reference, operation)
    valid = [p is not None for p, _ in ps]
    if operation == "extraction":
        s = scoring.fact_set([p["facts"] if p else [] for p, _ in ps], [r["facts"] for _, r in ps], threshold)
        return {f"fact_{k}": bootstrap([v if ok else 0.0 for v, ok in zip(s[k], valid)], samples=samples, seed=seed)
                for k in ("precision", "recall", "f1")}
    if operation == "update":
        predicted, gold = [event_of(p) for p, _ in ps], [event_of(r) for _, r in ps]
        e = scoring.events(predicted, gold)
        majority = max(EVENTS, key=gold.count) if gold else "NONE"
        baseline = [(majority, g) for g in gold]
        counts = {f"predicted_{c.lower()}": Estimate(float(predicted.count(c)), len(ps)) for c in EVENTS + (INVALID,)}
        counts.update({f"reference_{c.lower()}": Estimate(float(gold.count(c)), len(ps)) for c in EVENTS})
        return {"event_accuracy": proportion(e["correct"]),
                "event_macro_f1": bootstrap(list(zip(predicted, gold)), scoring.macro_f1, samples=samples,
                                            seed=seed),
                # Beyond chance: an interval that holds 0 means no measurable skill on these calls.
                "cohen_kappa": bootstrap(list(zip(predicted, gold)), scoring.cohen_kappa, samples=samples, seed=seed),
                # What always answering the reference's most common event scores on these very calls.
                "majority_baseline_accuracy": proportion([g == majority for g in gold]),
                "majority_baseline_macro_f1": bootstrap(baseline, scoring.macro_f1, samples=samples, seed=seed),
                **counts}
    if operation == "generation":
        answers, refs = [p["answer"] if p else "" for p, _ in ps], [r["answer"] for _, r in ps]
        return {"answer_token_f1": bootstrap(scoring.token_f1(answers, refs), samples=samples, seed=seed),
                "answer_rouge_l": bootstrap(scoring.rouge_l(answers, refs), samples=samples, seed=seed)}
    raise ValueError(f"unknown operation {operation!r}")
