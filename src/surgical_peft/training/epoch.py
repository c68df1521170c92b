"""One training epoch: forward (through the feature cache when there is one), backward, optimizer step; it stops the
run, on every process at once, when a loss or a trained tensor is not finite."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..errors import TrainingError
from ..features import FeatureCache

__all__ = ["train_epoch"]


def _check_finite(
    first_bad_step: torch.Tensor, steps: int, optimizer: torch.optim.Optimizer, accelerator: Accelerator
) -> str:
    """Why the epoch must not be kept ('' when it may): a non-finite loss on some process, or trained tensors that are
    not finite. Every process gets the same answer (one gather), so that all stop together."""
    tensors = [p for group in optimizer.param_groups for p in group["params"]]
    weights_bad = torch.stack([~torch.isfinite(p.detach()).all() for p in tensors]).any() if tensors else False
    flags = torch.stack([first_bad_step, torch.as_tensor(weights_bad, device=first_bad_step.device).long()])
    bad_steps, weights = accelerator.gather(flags.reshape(1, 2)).cpu().unbind(1)
    if (bad_steps > 0).any():
        return f"the loss is not finite (nan or inf) from step {int(bad_steps[bad_steps > 0].min())} of {steps}"
    if weights.any():
        return "the trained weights are not finite (nan or inf)"
    return ""


def train_epoch(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    *,
    cache: FeatureCache | None,
    description: str,
    progress: bool,
    before_batch: Callable[[int], None] | None = None,
) -> float:
    """Train `model` for one pass over `loader`; returns the mean training loss over every process. `before_batch`,
    if given, is called with each batch's index (from 0) before its forward pass (e.g. to switch the trained block).

    Raises:
        TrainingError: if a loss (on any process) or, after the last step, a trained tensor is not finite; the
            message names the epoch (`description`) and the first bad step.
    """
    model.train()
    total, count = torch.zeros((), device=accelerator.device), 0
    first_bad_step = torch.zeros((), dtype=torch.long, device=accelerator.device)  # from 1; 0: none (kept on device)
    bar = tqdm(loader, desc=description, leave=False, disable=not (progress and accelerator.is_main_process))
    for batch in bar:
        if before_batch is not None:
            before_batch(count)
        indices = batch.pop("index", None)
        with accelerator.accumulate(model):
            with cache.batch(indices) if cache is not None else contextlib.nullcontext():
                loss = model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        total += loss.detach()
        count += 1
        bad = (first_bad_step == 0) & ~torch.isfinite(loss.detach())
        first_bad_step = torch.where(bad, count, first_bad_step)
        if not bar.disable:  # `.item()` waits for the device: only for a bar someone sees
            bar.set_postfix(loss=f"{loss.item():.4f}")
    problem = _check_finite(first_bad_step, count, optimizer, accelerator)
    if problem:
        raise TrainingError(
            f"Training stopped in {description}: {problem}. Nothing of this epoch was saved; try a lower "
            "learning rate."
        )
    return float(accelerator.reduce(total, reduction="mean")) / max(count, 1)
