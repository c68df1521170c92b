"""Auto-RGN: blocks ranked by the mean relative gradient norm ||g|| / ||w|| of their tensors on the target loss,
averaged over `num_batches` batches."""

from ..gradients import rgn_per_tensor
from ._base import TensorCriterion

__all__ = ["CRITERION"]

CRITERION = TensorCriterion(
    name="rgn",
    description="Auto-RGN: mean relative gradient norm ||g||/||w|| of the block's tensors",
    tensor_scores=lambda model, names, parameters, batches: rgn_per_tensor(model, parameters, batches),
)
