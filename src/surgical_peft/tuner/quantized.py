"""A quantized frozen base: the tuned blocks train in full precision, every other block stays quantized.

A model loaded quantized (transformers' `BitsAndBytesConfig` for bitsandbytes 8- or 4-bit, `TorchAoConfig` for
torchao's int8 weight-only, or `torchao.quantization.quantize_` on any model) keeps integer weights that cannot train.
Surgical fine-tuning freezes everything outside its blocks, so those can stay quantized; inside the tuned blocks,
`get_peft_model` replaces each quantized module by a full-precision `nn.Linear` holding its dequantized weights (as
PEFT dequantizes them, leaving the quantized module unchanged), which the adapter then trains in place like any other
module. Its base snapshot, and so its deltas, are relative to those dequantized weights. The quantized modules are
kept: `unload()`, deleting the last adapter that tunes them, or a failed load puts them back; `merge_and_unload()`
leaves the tuned modules in full precision (their tuned weights cannot be quantized back without loss).

The base fingerprint sees the model as it was loaded (the quantized modules, not their replacements) and records
which quantized storage it held (`quantization_of`), so an adapter says which base it was tuned on and loads onto
that base quantized the same way (`surgical_peft.tuner.fingerprint`).

Example (with torchao installed, `pip install "surgical-peft[quantization]"`)::

    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    quantize_(model, Int8WeightOnlyConfig())
    FullPrecisionBlocks().replace(model, ["1"])
    type(model[0].weight).__name__, type(model[1].weight).__name__  # ('Int8Tensor', 'Parameter')

A model without quantized modules is left as it is:

    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> replaced = FullPrecisionBlocks()
    >>> replaced.replace(model, ["0"])
    >>> replaced.originals
    {}
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ..blocks.paths import is_under, join
from ..errors import InputError
from ._internals import dequantize_bnb_weight, dequantize_module_weight, get_bnb_param_type

__all__ = ["FullPrecisionBlocks", "full_precision_like", "quantization_of"]


def quantization_of(tensor: torch.Tensor) -> str | None:
    """The quantized storage `tensor` is, as `"<package> <class>"` (e.g. `"bitsandbytes Int8Params"`,
    `"torchao Int8Tensor"`), or `None` for a plain tensor.

    Example:
        >>> quantization_of(torch.nn.Parameter(torch.zeros(2))) is None
        True
    """
    package = type(tensor).__module__.split(".")[0]
    return None if package == "torch" else f"{package} {type(tensor).__name__}"


def full_precision_like(tensor: torch.Tensor) -> torch.Tensor:
    """What an adapter holds for `tensor`: for a quantized tensor stored as integers (bitsandbytes' `Int8Params`), a
    float32 tensor of its shape on the meta device (its module trains as a float32 copy, `FullPrecisionBlocks`);
    any other tensor as it is (torchao's tensors report their full-precision dtype themselves).

    Example:
        >>> full_precision_like(torch.zeros(2, dtype=torch.int8)).dtype  # a plain tensor: as it is
        torch.int8
    """
    if quantization_of(tensor) is None or tensor.is_floating_point():
        return tensor
    return torch.empty(tensor.shape, dtype=torch.float32, device="meta")


def _dequantized_weight(module: nn.Module) -> torch.Tensor:
    """`module`'s weight in full precision, leaving `module` as it is. (PEFT's `dequantize_module_weight` reassigns a
    bitsandbytes module's weight on a CPU and fills an 8-bit module's state, after which its own forward fails: the
    bitsandbytes weights are dequantized with a copy of the state here.)"""
    if get_bnb_param_type(module.weight):
        return dequantize_bnb_weight(module.weight, state=copy.copy(getattr(module, "state", None)))
    return dequantize_module_weight(module)


def _full_precision(path: str, module: nn.Module) -> nn.Linear:
    """An `nn.Linear` computing what the quantized linear `module` computes, with its weight dequantized and a copy
    of its bias."""
    if not isinstance(module, nn.Linear):
        raise InputError(
            f"Cannot train {path!r}: it is a quantized {type(module).__name__}, and only quantized linear layers are "
            "turned back into full precision."
        )
    weight = _dequantized_weight(module).detach()
    replacement = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
    replacement.to(weight.device, weight.dtype)
    with torch.no_grad():
        replacement.weight.copy_(weight)
        if module.bias is not None:
            replacement.bias.copy_(module.bias)
    replacement.requires_grad_(False)
    return replacement.train(module.training)


class FullPrecisionBlocks:
    """The quantized modules of tuned blocks, replaced in the model by full-precision copies, by path."""

    def __init__(self) -> None:
        self.originals: dict[str, nn.Module] = {}  # path -> the quantized module it replaced

    def replace(self, model: nn.Module, targets: Iterable[str]) -> None:
        """Replace every quantized module under `targets` (module paths) by a full-precision copy."""
        targets = list(targets)
        quantized = [
            (path, module)
            for path, module in model.named_modules()
            if is_under(path, targets) and path not in self.originals and self._is_quantized(module)
        ]
        replacements = [(path, _full_precision(path, module)) for path, module in quantized]  # all checked first
        for path, replacement in replacements:
            self.originals[path] = model.get_submodule(path)
            self._put(model, path, replacement)

    @staticmethod
    def _is_quantized(module: nn.Module) -> bool:
        return any(quantization_of(tensor) for tensor in module.parameters(recurse=False))

    @staticmethod
    def _put(model: nn.Module, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(model.get_submodule(parent), name, module)

    def restore(self, model: nn.Module, keep: Iterable[str] = ()) -> None:
        """Put back the quantized modules, but those under `keep` (the targets still tuned)."""
        keep = list(keep)
        for path in [path for path in self.originals if not is_under(path, keep)]:
            self._put(model, path, self.originals.pop(path))

    def forget(self) -> None:
        """Keep the full-precision copies in the model (after a merge)."""
        self.originals.clear()

    def as_loaded(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`state_dict` (the model's) with the replaced modules' entries as the quantized modules hold them."""
        replaced = list(self.originals)
        state = {path: tensor for path, tensor in state_dict.items() if not is_under(path, replaced)}
        for path, module in self.originals.items():
            state.update({join(path, name): t for name, t in module.state_dict(keep_vars=True).items()})
        return state

    def holds(self, tensor_path: str) -> bool:
        """Whether `tensor_path` belongs to a replaced module (its quantized original is the base)."""
        return is_under(tensor_path, list(self.originals))
