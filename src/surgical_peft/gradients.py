"""Per-tensor statistics of the gradients of the target loss: relative norms (Auto-RGN) and per-example
signal-to-noise ratios (Auto-SNR), as Lee et al. (ICLR 2023, section 5) rank blocks with them.

Gradients are taken with the model in eval mode (BatchNorm uses its running statistics, which therefore never move)
and with respect to the given parameters, frozen or not; afterwards the model's weights, buffers, `requires_grad`
flags and train/eval modes are as they were, and no `.grad` is written.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft.gradients import relative_gradient_norms
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(4)]
    >>> head = [model.classifier[1].weight]
    >>> norms = relative_gradient_norms(model, DataLoader(data, batch_size=2), parameters=head)
    >>> len(norms), norms[0] > 0
    (1, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from .blocks import unwrap_model
from .errors import InputError
from .modes import held_in_eval

__all__ = [
    "SCALE_FLOOR",
    "batch_count",
    "gradient_snr",
    "labelled_batches",
    "probing",
    "relative_gradient_norms",
    "rgn_per_tensor",
]

SCALE_FLOOR = 1e-6
"""A tensor whose entries' root mean square is below this has no scale to relate a gradient to (a bias initialised to
zeros): its relative gradient norm is undefined (NaN), where dividing by a floored norm gave scores of 1e10."""
_VARIANCE_FLOOR = 1e-30  # entries whose gradient is always 0 get SNR 0 rather than 0/0
_PER_EXAMPLE_CHUNK = 8  # examples whose per-example gradients are held in memory at once


def labelled_batches(
    dataloader: Any, num_batches: int | None, device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`(pixel_values, labels)` of the first `num_batches` batches (all with `None`), on `device`; checks them."""
    if num_batches is not None and num_batches < 1:
        raise InputError(f"num_batches must be at least 1, got {num_batches}.")
    count = 0
    for batch in dataloader:
        if not isinstance(batch, Mapping) or "pixel_values" not in batch or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise InputError(
                "Ranking blocks needs labelled target batches: dicts with 'pixel_values' and 'labels' "
                f"(e.g. from surgical_peft.experiments.data.preprocess); got {found}."
            )
        yield batch["pixel_values"].to(device), torch.as_tensor(batch["labels"]).to(device)
        count += 1
        if count == num_batches:
            return
    if count == 0:
        raise InputError("The dataloader is empty: ranking blocks needs at least one labelled target batch.")


def batch_count(dataloader: Any, num_batches: int | None) -> int | None:
    """How many batches `labelled_batches(dataloader, num_batches, ...)` yields: `num_batches`, or fewer when the
    dataloader holds fewer (`None` when neither says).

    Example:
        >>> batch_count([{"pixel_values": None, "labels": None}] * 3, 4), batch_count(iter([]), None)
        (3, None)
    """
    available = len(dataloader) if hasattr(dataloader, "__len__") else None
    if num_batches is None or available is None:
        return num_batches if available is None else available
    return min(num_batches, available)


@contextmanager
def probing(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and `requires_grad=True` on `parameters` for the duration; both restored afterwards."""
    flags = [(parameter, parameter.requires_grad) for parameter in parameters]
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        with held_in_eval([model]):
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def rgn_per_tensor(
    model: nn.Module, parameters: Sequence[nn.Parameter], batches: Iterator[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, int]:
    """Per-tensor ||g|| / ||w|| averaged over `batches` (NaN for a tensor without a scale, see `SCALE_FLOOR`), and
    the number of examples seen."""
    weight_norms = torch.stack([p.detach().float().norm() for p in parameters])
    sizes = torch.tensor([p.numel() for p in parameters], dtype=weight_norms.dtype, device=weight_norms.device)
    total = torch.zeros_like(weight_norms)  # the gradient norms summed over batches (the weights do not change)
    num_batches = num_examples = 0
    with probing(model, parameters), torch.enable_grad():
        for pixel_values, labels in batches:
            loss = F.cross_entropy(model(pixel_values=pixel_values).logits, labels)
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            norms = [g.detach().float().norm() if g is not None else torch.zeros(()) for g in grads]
            total += torch.stack([n.to(total.device) for n in norms])
            num_batches += 1
            num_examples += len(labels)
    scaled = weight_norms >= SCALE_FLOOR * sizes.sqrt()
    return torch.where(scaled, total / num_batches / weight_norms, torch.nan), num_examples


def gradient_snr(
    model: nn.Module,
    names: Sequence[str],
    parameters: Sequence[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, int]:
    """Per-tensor mean over entries of mean_g^2 / var_g over examples, and the number of examples seen.

    Per-example gradients come from `torch.func` (`functional_call` + `vmap` + `grad`)."""
    detached = {name: p.detach() for name, p in zip(names, parameters, strict=True)}
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in detached.items()}
    squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in detached.items()}

    def example_loss(params: dict[str, torch.Tensor], pixel_values: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, args=(), kwargs={"pixel_values": pixel_values.unsqueeze(0)}).logits
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    count = 0
    with probing(model, []):
        for pixel_values, labels in batches:
            for start in range(0, len(labels), _PER_EXAMPLE_CHUNK):
                chunk = slice(start, start + _PER_EXAMPLE_CHUNK)
                for name, g in per_example(detached, pixel_values[chunk], labels[chunk]).items():
                    g = g.double()
                    sums[name] += g.sum(0)
                    squares[name] += (g * g).sum(0)
            count += len(labels)
    if count < 2:
        raise InputError(f"The SNR criterion needs at least 2 target examples to measure a variance, got {count}.")
    scores = []
    for name in names:
        mean = sums[name] / count
        variance = (squares[name] / count - mean * mean).clamp_min(0) * count / (count - 1)
        scores.append(float((mean * mean / (variance + _VARIANCE_FLOOR)).mean()))
    return torch.tensor(scores), count


def relative_gradient_norms(
    model: nn.Module,
    dataloader: Any,
    *,
    parameters: Sequence[nn.Parameter] | None = None,
    num_batches: int = 4,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Relative gradient norm ||g|| / ||w|| of the target loss for each tensor, averaged over a few batches (Auto-RGN).

    The model may be wrapped by DDP or be a `PeftModel`; gradients are taken on the unwrapped model in eval mode and
    leave weights, buffers, `requires_grad`, modes and `.grad` untouched. With an `accelerator` running several
    processes, each averages over its own batches and the results are averaged over processes, so all ranks agree.

    Args:
        model: a model returning `.logits` for `pixel_values`.
        dataloader: batches of `{"pixel_values", "labels"}`.
        parameters: the tensors to measure (default: every parameter that requires grad), in the order of the result.
        num_batches: batches to average over.
        accelerator: the `Accelerator` the model was prepared with, if any.

    Returns:
        One value per tensor of `parameters`, in order; NaN for a tensor without a scale (`SCALE_FLOOR`).
    """
    module = unwrap_model(model)
    parameters = list(parameters) if parameters is not None else [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise InputError("No parameters to measure: none was given and none requires grad.")
    values, _ = rgn_per_tensor(module, parameters, labelled_batches(dataloader, num_batches, parameters[0].device))
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean")
    return values.tolist()
