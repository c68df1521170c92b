"""The optimizer of a phase (AdamW over the tensors it trains), and Auto-RGN's per-tensor learning rates."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..gradients import relative_gradient_norms
from .arguments import FineTuneArguments

__all__ = ["make_optimizer", "scale_learning_rates_by_rgn"]


def make_optimizer(parameters: list[nn.Parameter], learning_rate: float, args: FineTuneArguments) -> torch.optim.AdamW:
    """AdamW over `parameters`; with `lr_mode="rgn"`, one parameter group per tensor (their rates are scaled apart)."""
    per_tensor = args.lr_mode == "rgn"
    groups = [{"params": [p]} for p in parameters] if per_tensor else [{"params": parameters}]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=args.weight_decay)


def scale_learning_rates_by_rgn(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    parameters: list[nn.Parameter],
    dataloader: DataLoader,
    accelerator: Accelerator,
    learning_rate: float,
) -> None:
    """Give each tensor's group `learning_rate` times its relative gradient norm over the largest one (Auto-RGN)."""
    norms = relative_gradient_norms(model, dataloader, parameters=parameters, accelerator=accelerator)
    largest = max(norms) or 1.0
    for group, norm in zip(optimizer.param_groups, norms, strict=True):
        group["lr"] = learning_rate * norm / largest
