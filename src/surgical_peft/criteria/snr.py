"""Auto-SNR: blocks ranked by the mean signal-to-noise ratio of their tensors' per-example gradients.

`BlockRanking.tensor_mask(threshold)` masks the low-SNR tensors (those below `threshold` times the largest tensor
score), which is how Auto-SNR tunes a subset of tensors across the whole model."""

from ..gradients import gradient_snr
from ._base import TensorCriterion

__all__ = ["CRITERION"]

CRITERION = TensorCriterion(
    name="snr",
    description="Auto-SNR: mean gradient signal-to-noise ratio of the block's tensors",
    tensor_scores=gradient_snr,
)
