"""Token-level F1 between a prediction and a reference (SQuAD / LoCoMo style), as an `evaluate` module.

The hub's `squad` metric computes the same F1 but only as a corpus aggregate over SQuAD-shaped dicts and it is
fetched from the hub; this module ships with the repo, is loaded by path (`evaluate.load(<folder>)`), and
returns the per-example scores too, so the caller can put a bootstrap confidence interval on the mean.
"""

import re
import string
from collections import Counter

import datasets
import evaluate

_DESCRIPTION = """Token F1: answers are lower-cased, punctuation and the articles a/an/the removed, split on
white space; F1 is the harmonic mean of token precision and recall (multiset overlap). Two empty answers
score 1, one empty answer scores 0."""

_KWARGS = """
Args:
    predictions (list[str]): predicted texts.
    references (list[str]): reference texts, one per prediction.
Returns:
    token_f1 (float): mean F1; precision, recall (float): means; scores (list[float]): F1 per example.
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    text = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def prf(prediction: str, reference: str) -> tuple[float, float, float]:
    pred, ref = normalize(prediction), normalize(reference)
    if not pred and not ref:
        return 1.0, 1.0, 1.0
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0, 0.0, 0.0
    p, r = same / len(pred), same / len(ref)
    return p, r, 2 * p * r / (p + r)


class TokenF1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Rajpurkar et al., SQuAD (2016); Maharana et al., LoCoMo (2024)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        triples = [prf(p, r) for p, r in zip(predictions, references)]
        n = max(len(triples), 1)
        return {
            "token_f1": sum(t[2] for t in triples) / n,
            "precision": sum(t[0] for t in triples) / n,
            "recall": sum(t[1] for t in triples) / n,
            "scores": [t[2] for t in triples],
        }
