"""`evaluate_accuracy`: top-1 accuracy on a dataloader, gathered over every process, with the metric shipped in this
package (`surgical_peft.training.metrics`, loadable offline)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .metrics import load_accuracy

__all__ = ["evaluate_accuracy"]


def evaluate_accuracy(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator | None = None, *, progress: bool = False
) -> float:
    """Top-1 accuracy of `model` on a prepared dataloader of `{"pixel_values", "labels"}` batches, gathered over all
    processes (each example counted once).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> model = lambda pixel_values: type("Out", (), {"logits": pixel_values})()
        >>> batches = DataLoader([{"pixel_values": torch.tensor([0.0, 1.0]), "labels": 1}], batch_size=1)
        >>> evaluate_accuracy(model, batches)
        1.0
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    metric = load_accuracy()
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    bar = tqdm(dataloader, desc="evaluate", leave=False, disable=not (progress and accelerator.is_main_process))
    with torch.no_grad():
        for batch in bar:
            logits = model(pixel_values=batch["pixel_values"]).logits
            predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            metric.add_batch(predictions=predictions.cpu(), references=references.cpu())
    if was_training:
        model.train()
    return float(metric.compute()["accuracy"])
