"""`fan_out`: one input through several adapters, sharing the frozen layers before the earliest tuned block.

Where adapters tune late blocks of one base (SubTuning's multi-task inference, Kaplun et al. 2023), the frozen
layers before them give every adapter the same output, so they run once: the batch runs as one, and at the first
block where the adapters' weights differ its rows are copied, one copy per set of adapters that need the same
weights there (the copies stacked along the batch, one after the other); from there on the stacked batch runs as a
mixed batch, each copy with its adapter's weights, and the frozen layers after the tuned blocks run once over it.
One forward pass in all, whose cost is bounded by K·F / (F + (K-1)·F_suffix) for K adapters, a forward pass of F
FLOPs and F_suffix from the earliest tuned block on (`benchmarks/serving.py` measures it).

Copying rows at a block's input is exact when everything after it depends on the batch only through that block's
output. The shared path is therefore taken when the model gets one tensor (`pixel_values`, or `input_ids` alone) and
the block takes only tensors with a row per example: then no tensor made before the block (an attention mask) reaches
a layer after it with the original number of rows. Otherwise (`input_ids` with an `attention_mask`; a block that takes
a mask or a cache) the input is stacked once per adapter up front and runs as a mixed batch: correct, with nothing
shared.

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import SurgicalConfig, fan_out
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> model = get_peft_model(base, SurgicalConfig(block="stage2", init_weights=False), adapter_name="one")
    >>> model.add_adapter("two", SurgicalConfig(block="head", init_weights=False))
    >>> _ = model.eval()
    >>> x = torch.randn(2, 3, 32, 32)
    >>> outputs = fan_out(model, adapter_names=["one", "two"], pixel_values=x)
    >>> model.set_adapter("two")
    >>> bool((outputs["two"].logits - model(pixel_values=x).logits).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import InputError
from .mixed import check_names
from .rows import as_index, first_rows, leaves, take
from .session import CopyAtInput, Rows, serve

__all__ = ["fan_out"]


@torch.no_grad()
def fan_out(peft_model: Any, adapter_names: Sequence[str], **inputs: Any) -> dict[str, Any]:
    """Run `inputs` (the model's keyword arguments) through each adapter of `adapter_names` (`"__base__"`: the base
    model), in eval mode and without gradients: `{name: output}`, each output equal to that adapter run alone. The
    frozen layers before the earliest of their tuned blocks run once (see the module docstring).

    Raises:
        InputError: for a model that is not a PeftModel with surgical adapters, unknown or repeated names, a model
            in training mode or with adapters disabled, or inputs without a batch.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import SurgicalConfig
        >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> model = get_peft_model(base, SurgicalConfig(block="head", init_weights=False), adapter_name="head").eval()
        >>> outputs = fan_out(model, ["head", "__base__"], pixel_values=torch.randn(3, 3, 32, 32))
        >>> tuned, plain = outputs["head"].logits, outputs["__base__"].logits  # each as that adapter alone gives it
        >>> tuned.shape, torch.equal(tuned, plain)
        (torch.Size([3, 2]), False)
    """
    tuner = getattr(peft_model, "base_model", None)
    if not hasattr(tuner, "surgical_layers"):
        raise InputError(
            "fan_out takes a PeftModel with surgical adapters (peft.get_peft_model(model, SurgicalConfig(...)))."
        )
    names = check_names(tuner, adapter_names)
    if not names or len(set(names)) < len(names):
        raise InputError(f"fan_out takes distinct adapter names, at least one; got {names}.")
    if not peft_model.has_active_enabled_adapter:
        raise InputError("Adapters are disabled (inside disable_adapter()): fan_out would give the base for all.")
    count = first_rows(inputs)
    if count is None:
        raise InputError(f"fan_out found no batch in its inputs ({sorted(inputs)}): pass the model's tensors.")
    tensors = [value for value in inputs.values() if isinstance(value, torch.Tensor)]
    if len(tensors) == 1:
        try:
            return _shared(peft_model, tuner, names, count, inputs)
        except CopyAtInput:
            pass
    return _stacked(peft_model, tuner, names, count, inputs)


def _shared(peft_model: Any, tuner: Any, names: list[str], count: int, inputs: dict[str, Any]) -> dict[str, Any]:
    """One batch of `count` rows, copied at the first block where the adapters' weights differ."""
    with serve(tuner, Rows(((*names,),) * count, copies=True)) as rows:
        output = peft_model(**inputs)
    return {
        name: _rows_of(output, [row for row, adapters in enumerate(rows.current) if name in adapters], rows.current)
        for name in names
    }


def _stacked(peft_model: Any, tuner: Any, names: list[str], count: int, inputs: dict[str, Any]) -> dict[str, Any]:
    """The input stacked once per adapter (every tensor with `count` rows), run as one mixed batch."""
    stacked = {
        key: torch.cat([value] * len(names)) if first_rows(value) == count else value for key, value in inputs.items()
    }
    rows = tuple((name,) for name in names for _ in range(count))
    with serve(tuner, Rows(rows)):
        output = peft_model(**stacked)
    return {name: _rows_of(output, range(i * count, (i + 1) * count), rows) for i, name in enumerate(names)}


def _rows_of(output: Any, rows_of_name: Sequence[int], rows: tuple) -> Any:
    """One adapter's rows of the model's `output`; an `InputError` for a part of it that is not one row per example
    (a loss over the whole batch, a cache)."""
    for leaf in leaves(output):
        per_row = leaf.dim() > 0 and leaf.shape[0] == len(rows) if isinstance(leaf, torch.Tensor) else False
        if not per_row and not (leaf is None or isinstance(leaf, (bool, int, float, str))):
            shape = f" of shape {tuple(leaf.shape)}" if isinstance(leaf, torch.Tensor) else ""
            raise InputError(
                f"fan_out cannot split the model's output {type(leaf).__name__}{shape} per adapter: it is not one row "
                "per example (leave out labels; for a causal LM pass use_cache=False)."
            )
    device = next(leaf.device for leaf in leaves(output) if isinstance(leaf, torch.Tensor))
    return take(output, as_index(list(rows_of_name), device))
