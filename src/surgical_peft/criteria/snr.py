"""Auto-SNR: blocks ranked by the mean signal-to-noise ratio of their tensors' per-example gradients.

`BlockRanking.tensor_mask(threshold)` masks the low-SNR tensors (those below `threshold` times the largest tensor
score), which is how Auto-SNR tunes a subset of tensors across the whole model."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..gradients import gradient_snr
from ._base import TensorCriterion

__all__ = ["CRITERION", "GradientSNR"]


class GradientSNR(TensorCriterion):
    """Per-tensor mean over entries of mean_g^2 / var_g over examples."""

    name = "snr"
    description = "Auto-SNR: mean gradient signal-to-noise ratio of the block's tensors"

    def tensor_scores(
        self, model: nn.Module, names: list[str], parameters: list[nn.Parameter], batches: Any
    ) -> tuple[torch.Tensor, int]:
        return gradient_snr(model, names, parameters, batches)


CRITERION = GradientSNR()
