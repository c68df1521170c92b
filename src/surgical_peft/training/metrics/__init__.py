"""Metric modules shipped with the package, loadable by `evaluate` without network access."""

from pathlib import Path

import evaluate

__all__ = ["load_accuracy"]


def load_accuracy() -> evaluate.EvaluationModule:
    """`evaluate.load("accuracy")`, from the copy shipped here (works offline).

    Example:
        >>> load_accuracy().compute(predictions=[1, 1], references=[1, 0])
        {'accuracy': 0.5}
    """
    return evaluate.load(str(Path(__file__).parent / "accuracy"))
