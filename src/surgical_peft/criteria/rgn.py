"""Auto-RGN: blocks ranked by the mean relative gradient norm ||g|| / ||w|| of their tensors on the target loss."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gradients import rgn_per_tensor
from ._base import TensorCriterion

__all__ = ["CRITERION", "RelativeGradientNorm"]


class RelativeGradientNorm(TensorCriterion):
    """Per-tensor ||g|| / ||w||, averaged over `num_batches` batches."""

    name = "rgn"
    description = "Auto-RGN: mean relative gradient norm ||g||/||w|| of the block's tensors"

    def tensor_scores(
        self, model: nn.Module, names: list[str], parameters: list[nn.Parameter], batches: Any
    ) -> tuple[torch.Tensor, int]:
        return rgn_per_tensor(model, parameters, batches)


CRITERION = RelativeGradientNorm()
