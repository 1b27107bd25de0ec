"""Sentence BLEU-1 (unigram precision with brevity penalty), as LoCoMo and Mem0 report it, as an `evaluate`
module.

The hub's `bleu` metric is a corpus BLEU-4 fetched from the hub; the QA literature on LoCoMo reports the mean of
sentence-level BLEU-1 (`nltk.translate.bleu_score.sentence_bleu`, weights (1, 0, 0, 0)). Tokens are normalized
the same way as for token F1 (lower case, no punctuation, no articles), so no nltk tokenizer data is needed.
"""

import re
import string

import datasets
import evaluate
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

_DESCRIPTION = "Sentence-level BLEU-1 between each prediction and its single reference; 0 for an empty prediction."

_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
Returns:
    bleu1 (float): mean; scores (list[float]): per example.
"""

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> list[str]:
    text = "".join(ch for ch in (text or "").lower() if ch not in _PUNCT)
    return _ARTICLES.sub(" ", text).split()


def bleu1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    return float(sentence_bleu([ref], pred, weights=(1.0, 0.0, 0.0, 0.0),
                               smoothing_function=SmoothingFunction().method1))


class Bleu1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Papineni et al., BLEU (2002); Maharana et al., LoCoMo (2024)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references):
        scores = [bleu1(p, r) for p, r in zip(predictions, references)]
        return {"bleu1": sum(scores) / max(len(scores), 1), "scores": scores}
