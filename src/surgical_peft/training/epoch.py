"""One training epoch: forward (through the feature cache when there is one), backward, optimizer step."""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..features import FeatureCache

__all__ = ["train_epoch"]


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    *,
    cache: FeatureCache | None,
    description: str,
    progress: bool,
) -> float:
    """Train `model` for one pass over `loader`; returns the mean training loss over every process."""
    model.train()
    total, count = torch.zeros((), device=accelerator.device), 0
    bar = tqdm(loader, desc=description, leave=False, disable=not (progress and accelerator.is_main_process))
    for batch in bar:
        indices = batch.pop("index", None)
        with accelerator.accumulate(model):
            with cache.batch(indices) if cache is not None else contextlib.nullcontext():
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        total += loss.detach()
        count += 1
        if not bar.disable:  # `.item()` waits for the device: only for a bar someone sees
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return float(accelerator.reduce(total, reduction="mean")) / max(count, 1)
