"""Accuracy and macro-F1 of the memory update decision (ADD / UPDATE / DELETE / NONE), as an `evaluate` module.

The hub's `accuracy` and `f1` metrics wrap scikit-learn and are fetched from the hub; this one ships with the
repo. A prediction outside the class set (e.g. "INVALID" for output that did not parse) is always wrong: it
counts against the reference's class and is not a class of its own in the macro average.
"""

import datasets
import evaluate

_DESCRIPTION = """accuracy = share of predictions equal to the reference. macro_f1 = unweighted mean of per-class
F1 over the classes (of `labels`) that occur in the references or the predictions."""

_KWARGS = """
Args:
    predictions (list[str]), references (list[str]).
    labels (list[str]): the classes. Default ADD, UPDATE, DELETE, NONE.
Returns:
    accuracy, macro_f1 (float); per_class_f1 (dict); correct (list[int]): per example.
"""

EVENTS = ("ADD", "UPDATE", "DELETE", "NONE")


def macro_f1(predictions, references, labels=EVENTS):
    present = [c for c in labels if c in set(references) | set(predictions)]
    per_class = {}
    for c in present:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        per_class[c] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return (sum(per_class.values()) / len(per_class) if per_class else 0.0), per_class


class EventClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}),
        )

    def _compute(self, predictions, references, labels=EVENTS):
        correct = [int(p == r) for p, r in zip(predictions, references)]
        value, per_class = macro_f1(predictions, references, tuple(labels))
        return {"accuracy": sum(correct) / max(len(correct), 1), "macro_f1": value, "per_class_f1": per_class,
                "correct": correct}
