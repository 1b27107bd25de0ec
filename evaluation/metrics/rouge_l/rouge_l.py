"""ROUGE-L F-measure per example, through Google's `rouge_score` package, as an `evaluate` module.

Same computation as the hub's `rouge` metric (rougeL, no stemming, rouge_score's own regex tokenizer), shipped in
the repo so nothing is fetched at run time. Only `rougeL` is computed: `rougeLsum` splits sentences with nltk's
punkt model, which would need a download.
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = "ROUGE-L (longest common subsequence) F-measure between each prediction and its reference."

_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
    use_stemmer (bool): Porter-stem tokens first (nltk's stemmer, no data download). Default False.
Returns:
    rougeL (float): mean F-measure; scores (list[float]): per example.
"""


class RougeL(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries (2004)",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
        scores = [scorer.score(r or "", p or "")["rougeL"].fmeasure for p, r in zip(predictions, references)]
        return {"rougeL": sum(scores) / max(len(scores), 1), "scores": scores}
