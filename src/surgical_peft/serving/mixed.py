"""PEFT's mixed-adapter batches for surgical adapters: `peft_model(**inputs, adapter_names=[...])`, one adapter name
per example (`"__base__"` for the base model), in eval mode, as LoRA takes them; causal LMs through `generate`.

PEFT hands `adapter_names` to the tuner's `_enable_peft_forward_hooks`, which runs the call inside `mixed_batch`:
each row then equals that adapter run alone (its blocks' weights and BatchNorm statistics), adapters on different
blocks mix in one batch, and every layer outside all the named adapters' blocks runs once over the whole batch
(`surgical_peft.serving.session`). With `generate`'s beam search or several return sequences, each name covers its
example's expanded rows, as LoRA's do. PEFT does not pass `adapter_names` to a tuner while adapters are disabled
(`with peft_model.disable_adapter():`): every row then runs the base model, for LoRA too.

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import SurgicalConfig
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> model = get_peft_model(base, SurgicalConfig(block="stage1", init_weights=False), adapter_name="one")
    >>> model.add_adapter("two", SurgicalConfig(block="stage2", init_weights=False))
    >>> _ = model.eval()
    >>> x = torch.randn(3, 3, 32, 32)
    >>> mixed = model(pixel_values=x, adapter_names=["one", "two", "__base__"]).logits
    >>> model.set_adapter("two")
    >>> bool((mixed[1] - model(pixel_values=x).logits[1]).abs().max() < 1e-5), model.active_adapter
    (True, 'two')
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .session import BASE, Rows, serve

if TYPE_CHECKING:
    from ..tuner.model import SurgicalModel

__all__ = ["check_names", "mixed_batch"]


def check_names(tuner: SurgicalModel, adapter_names: Any, what: str = "adapter_names") -> list[str]:
    """`adapter_names` as a list, or an `InputError` naming the problem: not a list of names, or unknown names (the
    tuner's adapters and `"__base__"` are valid), or a model in training mode."""
    if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
        raise InputError(f"{what} takes a list of adapter names, got {adapter_names!r}.")
    valid = [*tuner.peft_config, BASE]
    unknown = sorted({name for name in adapter_names if name not in valid})
    if unknown:
        raise InputError(f"{what}: unknown adapter(s) {unknown}. Valid: {valid}.")
    if tuner.training:
        raise InputError(f"{what} is for inference: call model.eval() first (the model is in training mode).")
    return list(adapter_names)


def _expansion(kwargs: Mapping[str, Any]) -> int:
    """How many rows `generate` makes of each example: its beams or return sequences, where the call names them."""
    config = kwargs.get("generation_config")
    sizes = [kwargs.get(name, getattr(config, name, None)) for name in ("num_beams", "num_return_sequences")]
    return max([1, *(size for size in sizes if isinstance(size, int))])


@contextlib.contextmanager
def mixed_batch(tuner: SurgicalModel, kwargs: Mapping[str, Any]) -> Iterator[None]:
    """Within this block, a call of the model runs each example with the adapter that `kwargs["adapter_names"]`
    names for it (PEFT's keyword); without that keyword, the model runs as it is."""
    adapter_names = kwargs.get("adapter_names")
    if adapter_names is None:
        yield
        return
    names = check_names(tuner, adapter_names)
    with serve(tuner, Rows(tuple((name,) for name in names), expanded=_expansion(kwargs))):
        yield
