"""Precision / recall / F1 between two sets of extracted facts with fuzzy matching, as an `evaluate` module.

`evaluate` has no set-matching metric. Two facts match when their token F1 (SQuAD normalization) reaches
`threshold`; facts are paired one-to-one, best pairs first (greedy maximum-weight matching), so a duplicated
prediction cannot match the same reference twice.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """Per example: matched = one-to-one pairs of (predicted fact, reference fact) with token F1 >=
threshold; precision = matched / |predicted|, recall = matched / |reference|. An empty predicted set has
precision 1 when the reference is empty too, else 0 (and symmetrically for recall): two empty sets agree."""

_KWARGS = """
Args:
    predictions (list[list[str]]): predicted fact sets.
    references (list[list[str]]): reference fact sets.
    threshold (float): token F1 a pair needs to match. Default 0.5.
Returns:
    precision, recall, f1 (float): means over examples (macro); micro_precision, micro_recall, micro_f1 (float):
    over all facts pooled; precision_scores, recall_scores, f1_scores (list[float]): per example.
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    text = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def token_f1(a: str, b: str) -> float:
    x, y = normalize(a), normalize(b)
    if not x and not y:
        return 1.0
    same = sum((Counter(x) & Counter(y)).values())
    if same == 0:
        return 0.0
    p, r = same / len(x), same / len(y)
    return 2 * p * r / (p + r)


def match_count(predicted: list[str], reference: list[str], threshold: float) -> int:
    pairs = sorted(
        ((token_f1(p, r), i, j) for i, p in enumerate(predicted) for j, r in enumerate(reference)),
        key=lambda t: (-t[0], t[1], t[2]),
    )
    used_p, used_r, matched = set(), set(), 0
    for score, i, j in pairs:
        if score < threshold:
            break
        if i not in used_p and j not in used_r:
            used_p.add(i)
            used_r.add(j)
            matched += 1
    return matched


def _ratio(num: int, den: int, other_empty: bool) -> float:
    if den == 0:
        return 1.0 if other_empty else 0.0
    return num / den


class FactSet(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("string")),
                                        "references": datasets.Sequence(datasets.Value("string"))}),
        )

    def _compute(self, predictions, references, threshold=0.5):
        ps, rs, fs = [], [], []
        tot_m = tot_p = tot_r = 0
        for pred, ref in zip(predictions, references):
            pred, ref = list(pred or []), list(ref or [])
            m = match_count(pred, ref, threshold)
            p = _ratio(m, len(pred), not ref)
            r = _ratio(m, len(ref), not pred)
            ps.append(p)
            rs.append(r)
            fs.append(2 * p * r / (p + r) if p + r else 0.0)
            tot_m, tot_p, tot_r = tot_m + m, tot_p + len(pred), tot_r + len(ref)
        n = max(len(fs), 1)
        mp = _ratio(tot_m, tot_p, tot_r == 0)
        mr = _ratio(tot_m, tot_r, tot_p == 0)
        return {
            "precision": sum(ps) / n, "recall": sum(rs) / n, "f1": sum(fs) / n,
            "micro_precision": mp, "micro_recall": mr, "micro_f1": 2 * mp * mr / (mp + mr) if mp + mr else 0.0,
            "precision_scores": ps, "recall_scores": rs, "f1_scores": fs,
        }
