"""Metric functions, computed through the `evaluate` library with the metric modules shipped in `metrics/`.

Each module is loaded by path (`evaluate.load(str(folder))`), so nothing is fetched from a hub at run time; none
of them needs nltk data (no punkt: tokens are split by regular expressions, rougeLsum is not used). Functions
return per-example scores, which `stats` turns into confidence intervals.

Not through `evaluate`, because it has nothing suitable: JSON validity and judge accuracy are plain proportions
(`stats.proportion`), latency percentiles and throughput are arithmetic over timings (`stats.percentile`).
"""

from __future__ import annotations

import functools
import re
import sys
from pathlib import Path

from memlora.memory.prompts import NOT_MENTIONED

METRICS_DIR = Path(__file__).resolve().parent / "metrics"
SHIPPED = ("token_f1", "rouge_l", "bleu1", "fact_set", "event_classification")

# What LoCoMo's own scorer accepts as "the conversation does not say" for adversarial (category-5) questions.
ABSTAIN = re.compile(r"not mentioned|no information|not available in the conversation", re.I)


@functools.lru_cache(maxsize=None)
def load(name: str):
    """The shipped metric module `name`, loaded by path and kept in memory (no Arrow cache files)."""
    import evaluate

    if name not in SHIPPED:
        raise KeyError(f"no shipped metric {name!r} (have: {', '.join(SHIPPED)})")
    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def module_function(name: str, function: str):
    """A plain function of a loaded metric module (used to recompute a statistic inside a bootstrap)."""
    metric = load(name)
    return getattr(sys.modules[type(metric).__module__], function)


def token_f1(predictions: list[str], references: list[str]) -> list[float]:
    if not predictions:
        return []
    return load("token_f1").compute(predictions=predictions, references=references)["scores"]


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    if not predictions:
        return []
    return load("rouge_l").compute(predictions=predictions, references=references)["scores"]


def bleu1(predictions: list[str], references: list[str]) -> list[float]:
    if not predictions:
        return []
    return load("bleu1").compute(predictions=predictions, references=references)["scores"]


def extracted_facts(value) -> list[str]:
    """The facts of an extraction answer: ours and Mem0 1.x's `{"facts": [str]}`, or Mem0 2.x's
    `{"memory": [{"text": ...}]}` (its ADD-only extraction call)."""
    if not isinstance(value, dict):
        return []
    if isinstance(value.get("facts"), list):
        return [str(f) for f in value["facts"]]
    if isinstance(value.get("memory"), list):
        return [str(m.get("text", "")) for m in value["memory"] if isinstance(m, dict) and m.get("text")]
    return []


def fact_set(predictions: list[list[str]], references: list[list[str]], threshold: float) -> dict[str, list[float]]:
    """Per example precision, recall and F1 of fuzzy fact matching."""
    if not predictions:
        return {"precision": [], "recall": [], "f1": []}
    out = load("fact_set").compute(predictions=predictions, references=references, threshold=threshold)
    return {"precision": out["precision_scores"], "recall": out["recall_scores"], "f1": out["f1_scores"]}


def events(predictions: list[str], references: list[str]) -> dict:
    """accuracy, macro_f1, per-example `correct` flags."""
    if not predictions:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "correct": [], "per_class_f1": {}}
    return load("event_classification").compute(predictions=predictions, references=references)


def macro_f1(pairs) -> float:
    """Macro-F1 of rows (prediction, reference): the statistic the bootstrap recomputes per resample."""
    fn = module_function("event_classification", "macro_f1")
    return fn([p for p, _ in pairs], [r for _, r in pairs])[0]


def cohen_kappa(pairs) -> float:
    """Agreement of rows (prediction, reference) beyond what the two label frequencies give by chance: 1 perfect,
    0 chance, below 0 worse than chance. A model that learnt the teacher's prior, not its decisions, scores 0
    however high its accuracy. NaN with no rows; 1 where both always say one and the same label."""
    n = len(pairs)
    if n == 0:
        return float("nan")
    observed = sum(p == g for p, g in pairs) / n
    labels = {x for pair in pairs for x in pair}
    expected = sum((sum(p == c for p, _ in pairs) / n) * (sum(g == c for _, g in pairs) / n) for c in labels)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def abstains(answer: str) -> bool:
    return bool(answer) and (ABSTAIN.search(answer) is not None or NOT_MENTIONED.lower() in answer.lower())


def qa_scores(answers: list[str], golds: list[str], categories: list[int]) -> dict[str, list[float]]:
    """Token F1 and BLEU-1 against the gold answer, per question. Category-5 (adversarial) questions ask about
    something the conversation never says: as in LoCoMo's scorer, an answer scores 1 on both if it says the
    information is not mentioned / not available, else 0."""
    f1 = token_f1(answers, golds)
    b1 = bleu1(answers, golds)
    for i, category in enumerate(categories):
        if category == 5:
            f1[i] = b1[i] = float(abstains(answers[i]))
    return {"token_f1": list(f1), "bleu1": list(b1)}
