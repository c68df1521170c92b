"""The model's head as a linear probe: its `nn.Linear`, and its inputs (the penultimate features) computed once.

Example:
    >>> import torch
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(6)]
    >>> features, labels = head_inputs(model, data, batch_size=4)
    >>> features.shape, labels.tolist()
    (torch.Size([6, 16]), [0, 1, 0, 1, 0, 1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..blocks import HEAD, list_blocks, unwrap_model
from ..errors import InputError

__all__ = ["head_inputs", "head_linear"]


def head_linear(model: nn.Module) -> nn.Linear:
    """The one `nn.Linear` that holds every parameter of the model's `head` block.

    Raises:
        InputError: if the head is not a single linear layer (NoisyGD trains a linear probe).

    Example:
        >>> from torch import nn
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> head_linear(model)
        Linear(in_features=16, out_features=2, bias=True)
        >>> head_linear(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: The model has no 'head' block to probe. Its blocks:
        Sequential: 2 blocks, 58 parameters
        ...
    """
    base = unwrap_model(model)
    blocks = list_blocks(base)
    if HEAD not in blocks:
        raise InputError(f"The model has no {HEAD!r} block to probe. Its blocks:\n{blocks}")
    modules = [base.get_submodule(path) for path in blocks[HEAD]]
    linears = [m for module in modules for m in module.modules() if isinstance(m, nn.Linear)]
    parameters = sum(p.numel() for module in modules for p in module.parameters())
    if len(linears) != 1 or sum(p.numel() for p in linears[0].parameters()) != parameters:
        raise InputError(
            f"A private linear probe needs a head that is one nn.Linear; {', '.join(blocks[HEAD])} holds "
            f"{len(linears)} linear layers and {parameters} parameters."
        )
    return linears[0]


def head_inputs(
    model: nn.Module, dataset: Dataset | Sequence[dict[str, Any]], *, batch_size: int = 256
) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs of the model's head `nn.Linear` (float32, on the CPU) for every example, and their labels: one
    forward pass in eval mode without gradients (BatchNorm statistics do not move).

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> pixels = torch.randn(5, 3, 16, 16)
        >>> features, labels = head_inputs(model, [{"pixel_values": x, "labels": 1} for x in pixels], batch_size=2)
        >>> logits = model.eval()(pixel_values=pixels).logits  # the head's outputs: the model's logits
        >>> torch.allclose(head_linear(model)(features), logits, atol=1e-5), labels.tolist()
        (True, [1, 1, 1, 1, 1])
    """
    linear = head_linear(model)
    device = linear.weight.device
    captured: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    handle = linear.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach().float().cpu()))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in DataLoader(dataset, batch_size=batch_size):
                model(pixel_values=batch["pixel_values"].to(device))
                labels.append(torch.as_tensor(batch["labels"]).cpu())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(captured), torch.cat(labels)
