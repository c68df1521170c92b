"""Where adapter weights live while several adapters serve one batch.

The tuner keeps every adapter but the active one off the accelerator (stashed on the CPU; the base snapshot memory-
mapped), and serving keeps it that way: a mixed batch or `fan_out` copies the weights it needs to the device (and
dtype) of the module that runs them, once per call, and drops the copies when the call returns. Serving the same
adapters call after call on an accelerator, `keep_on_device` keeps their copies there between calls instead, until
its block ends. On the CPU, with the model's dtype, nothing is copied at all.

Example:
    >>> import torch
    >>> cache = DeviceCopies()
    >>> stashed, live = torch.zeros(2, dtype=torch.float64), torch.ones(2)
    >>> copy = cache.placed(stashed, live)
    >>> copy.dtype, cache.placed(stashed, live) is copy, cache.placed(live, live) is live
    (torch.float32, True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any
from weakref import WeakKeyDictionary

import torch
from torch import nn

from ..errors import InputError

__all__ = ["DeviceCopies", "copies_for", "keep_on_device"]


class DeviceCopies:
    """Copies of CPU tensors on the device and in the dtype of the live tensors they stand in for."""

    def __init__(self) -> None:
        # id of the source -> (the source, held so that its id stays its own, and its copy)
        self._copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def placed(self, tensor: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """`tensor` on `like`'s device and in its dtype: itself where it is already, else a copy made once."""
        if tensor.device == like.device and tensor.dtype == like.dtype:
            return tensor
        held = self._copies.get(id(tensor))
        if held is None or held[0] is not tensor:
            held = (tensor, tensor.detach().to(like.device, like.dtype))
            self._copies[id(tensor)] = held
        return held[1]


# tuner -> adapter name -> its copies kept on the device (`keep_on_device`)
_KEPT: WeakKeyDictionary[nn.Module, dict[str, DeviceCopies]] = WeakKeyDictionary()


def copies_for(tuner: nn.Module, adapter_name: str | None, per_call: DeviceCopies) -> DeviceCopies:
    """Where the device copies of `adapter_name`'s weights (`None`: the base's) go: kept ones where the user keeps
    them on the device, else `per_call` (dropped when the call returns)."""
    return _KEPT.get(tuner, {}).get(adapter_name or "__base__", per_call)


@contextlib.contextmanager
def keep_on_device(peft_model: Any, adapter_names: Sequence[str]) -> Iterator[None]:
    """Within this block, the device copies of `adapter_names`' weights (`"__base__"`: the base's) that mixed batches
    and `fan_out` make stay on the device, for later calls, instead of being made again for each call. They are freed
    when the block ends. The adapters' weights must not change meanwhile (training, loading).

    Example:
        >>> from peft import get_peft_model
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import SurgicalConfig
        >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
        >>> model = get_peft_model(base, SurgicalConfig(block="stage1"), adapter_name="one").eval()
        >>> with keep_on_device(model, ["one", "__base__"]):
        ...     logits = model(pixel_values=torch.randn(2, 3, 32, 32), adapter_names=["one", "__base__"]).logits
        >>> logits.shape
        torch.Size([2, 2])
    """
    tuner = peft_model.base_model
    unknown = [name for name in adapter_names if name != "__base__" and name not in tuner.peft_config]
    if unknown:
        raise InputError(f"Adapter(s) {unknown} not found. Available: {[*tuner.peft_config, '__base__']}.")
    kept = _KEPT.setdefault(tuner, {})
    added = [name for name in dict.fromkeys(adapter_names) if name not in kept]
    kept.update((name, DeviceCopies()) for name in added)
    try:
        yield
    finally:
        for name in added:
            del kept[name]
