"""The optimizer of a phase (AdamW over the tensors it trains), discriminative learning rates by block depth, and
Auto-RGN's per-tensor learning rates."""

from __future__ import annotations

import math

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader

from ..blocks import BlockMap
from ..gradients import relative_gradient_norms
from .arguments import FineTuneArguments

__all__ = ["block_depths", "make_optimizer", "scale_learning_rates_by_rgn"]


def block_depths(block_map: BlockMap, names: list[str]) -> list[int]:
    """For each parameter name, how many blocks below the model's top block its block is (0: the top block, or no
    block).

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import list_blocks
        >>> block_map = list_blocks(ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1])))
        >>> list(block_map)
        ['embedder', 'stage1', 'stage2', 'head']
        >>> block_depths(block_map, ["classifier.1.weight", "resnet.embedder.embedder.convolution.weight"])
        [0, 3]
    """
    order = list(block_map)
    return [len(order) - 1 - order.index(block) if block else 0 for block in map(block_map.block_of, names)]


def make_optimizer(
    parameters: list[nn.Parameter], learning_rate: float, args: FineTuneArguments, depths: list[int] | None = None
) -> torch.optim.AdamW:
    """AdamW over `parameters`; with `lr_mode="rgn"`, one parameter group per tensor (their rates are scaled apart);
    with `args.lr_decay` below 1, one group per block depth (`depths`, one per parameter, see `block_depths`) at
    `learning_rate * args.lr_decay**depth`."""
    if args.lr_mode == "rgn":
        groups = [{"params": [p]} for p in parameters]
    elif args.lr_decay != 1 and depths is not None:
        by_depth: dict[int, list[nn.Parameter]] = {}
        for parameter, depth in zip(parameters, depths, strict=True):
            by_depth.setdefault(depth, []).append(parameter)
        groups = [{"params": ps, "lr": learning_rate * args.lr_decay**d} for d, ps in sorted(by_depth.items())]
    else:
        groups = [{"params": parameters}]
    return torch.optim.AdamW(groups, lr=learning_rate, weight_decay=args.weight_decay)


def scale_learning_rates_by_rgn(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    parameters: list[nn.Parameter],
    dataloader: DataLoader,
    accelerator: Accelerator,
    learning_rate: float,
) -> None:
    """Give the group of each tensor of `parameters` (one tensor per group, see `make_optimizer`) `learning_rate`
    times its relative gradient norm over the largest one (Auto-RGN). A tensor without a scale (all zeros, see
    `surgical_peft.gradients.SCALE_FLOOR`) has an unbounded ratio, so it trains at `learning_rate`, as the largest
    ratio does."""
    norms = relative_gradient_norms(model, dataloader, parameters=parameters, accelerator=accelerator)
    largest = max((norm for norm in norms if not math.isnan(norm)), default=0.0) or 1.0
    groups = {id(group["params"][0]): group for group in optimizer.param_groups}
    for parameter, norm in zip(parameters, norms, strict=True):
        groups[id(parameter)]["lr"] = learning_rate * (1.0 if math.isnan(norm) else norm / largest)
