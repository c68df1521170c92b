"""Top-1 accuracy as an `evaluate` metric module, shipped with surgical-peft so it loads offline.

`evaluate.load("accuracy")` fetches its script from the Hub; `evaluate.load` on this file's folder needs no network.

Example:
    >>> from surgical_peft.training.metrics import load_accuracy
    >>> load_accuracy().compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""

import datasets
import evaluate

_DESCRIPTION = "Accuracy: the share of predictions equal to their reference label."
_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`): predicted labels.
    references (`list` of `int`): true labels.
Returns:
    accuracy (`float`): between 0 and 1.
"""
_CITATION = ""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions: list[int], references: list[int]) -> dict[str, float]:
        correct = sum(int(p == r) for p, r in zip(predictions, references, strict=True))
        return {"accuracy": correct / len(references) if references else 0.0}
