"""PEFT's `autocast_adapter_dtype`: on a float16 or bfloat16 model, the tuned modules train in float32.

PEFT keeps an adapter's weights in float32 on a half-precision base (its default,
`get_peft_model(..., autocast_adapter_dtype=True)`), because half-precision weights lose small updates. A surgical
adapter's weights are the tuned modules' own, so each module the adapter targets is upcast in place, as a unit: while
one of its adapters is loaded, its float16/bfloat16 tensors are float32 (the same tensor objects) and hooks run it in
float32. Its half-precision inputs are cast up and its float32 outputs back to the inputs' dtype, so the rest of the
model computes as before. With none of its adapters loaded (disabled, another adapter active, unloaded), a unit is
back in its own dtype: the base, exactly.

A target keeps its dtype where running it in float32 would break the model's forward: when a tensor under it is shared
with a module outside it (tied weights), when its parent is a `nn.MultiheadAttention` (whose forward uses its
children's weights directly), and when it holds a `modules_to_save` copy. A container's own tensors outside any target
module (a timm ViT's `cls_token`) keep theirs too.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)).to(torch.bfloat16)
    >>> units = Upcasts()
    >>> units.add(model, ["0"], "default")
    >>> units.apply(["default"])
    >>> model[0].weight.dtype, model[1].weight.dtype, model(torch.ones(1, 2, dtype=torch.bfloat16)).dtype
    (torch.float32, torch.bfloat16, torch.bfloat16)
    >>> units.apply([]); model[0].weight.dtype
    torch.bfloat16
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..blocks.paths import is_under
from ._internals import AuxiliaryTrainingWrapper

__all__ = ["HALF_DTYPES", "Upcasts"]

HALF_DTYPES = (torch.float16, torch.bfloat16)


def _cast(value: Any, source: tuple[torch.dtype, ...], target: torch.dtype) -> Any:
    """`value` with its tensors of a `source` dtype cast to `target` (through tuples, lists and dicts)."""
    if isinstance(value, torch.Tensor):
        return value.to(target) if value.dtype in source else value
    if isinstance(value, dict):  # (transformers' ModelOutput too: cast in place, keeping its type)
        for key in list(value):
            value[key] = _cast(value[key], source, target)
        return value
    if isinstance(value, (list, tuple)):
        items = [_cast(item, source, target) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def _first_half_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    """The dtype of the first half-precision tensor among a call's arguments (`None` if there is none)."""
    values = [*args, *kwargs.values()]
    while values:
        value = values.pop(0)
        if isinstance(value, torch.Tensor) and value.dtype in HALF_DTYPES:
            return value.dtype
        if isinstance(value, (list, tuple)):
            values[:0] = list(value)
        elif isinstance(value, dict):
            values[:0] = list(value.values())
    return None


class _Unit:
    """A target module that runs in float32 while hooked: its inputs up, its outputs back to their dtype."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.module = module
        self.dtype = dtype  # what its outputs go back to where its inputs hold no half-precision tensor (token ids)
        self.adapters: set[str] = set()
        self._input_dtypes: list[torch.dtype] = []  # a stack: a module may run inside itself (checkpointing)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []

    def tensors(self) -> list[torch.Tensor]:
        return [*self.module.parameters(), *(b for b in self.module.buffers() if b.is_floating_point())]

    def hook(self, on: bool) -> None:
        if on and not self._hooks:
            self._hooks = [
                self.module.register_forward_pre_hook(self._inputs_up, with_kwargs=True),
                self.module.register_forward_hook(self._outputs_down),
            ]
        elif not on:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []

    def _inputs_up(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self._input_dtypes.append(_first_half_dtype(args, kwargs) or self.dtype)
        return _cast(args, HALF_DTYPES, torch.float32), _cast(kwargs, HALF_DTYPES, torch.float32)

    def _outputs_down(self, module: nn.Module, args: tuple, output: Any) -> Any:
        return _cast(output, (torch.float32,), self._input_dtypes.pop())


class Upcasts:
    """The target modules of autocast adapters (`add`), upcast while one of their adapters is loaded (`apply`)."""

    def __init__(self) -> None:
        self.units: dict[str, _Unit] = {}  # target path -> unit
        self._dtypes: dict[int, tuple[torch.Tensor, torch.dtype]] = {}  # each half-precision tensor's own dtype
        self._up: set[str] = set()

    def add(self, model: nn.Module, targets: Iterable[str], adapter_name: str) -> None:
        """Make `adapter_name`'s target modules (paths) that can run in float32 units (see the module docstring)."""
        owners: dict[int, list[str]] = {}
        for path, tensor in [*model.named_parameters(remove_duplicate=False), *model.named_buffers()]:
            owners.setdefault(id(tensor), []).append(path)
        for path in targets:
            module = model.get_submodule(path)
            parent = model.get_submodule(path.rpartition(".")[0]) if path else None
            tensors = [*module.parameters(), *module.buffers()]
            shared = any(not is_under(owner, [path]) for t in tensors for owner in owners.get(id(t), []))
            wraps = any(isinstance(m, AuxiliaryTrainingWrapper) for m in module.modules())
            half = [t for t in tensors if t.dtype in HALF_DTYPES or id(t) in self._dtypes]
            if shared or wraps or isinstance(parent, nn.MultiheadAttention) or not half:
                continue
            for tensor in half:  # first seen before any unit upcast it: its own dtype
                self._dtypes.setdefault(id(tensor), (tensor, tensor.dtype))
            dtype = self._dtypes[id(half[0])][1]
            self.units.setdefault(path, _Unit(module, dtype)).adapters.add(adapter_name)

    def remove(self, adapter_name: str) -> None:
        """Forget `adapter_name`: units left without adapters are dropped (the next `apply` casts them back)."""
        for path, unit in list(self.units.items()):
            unit.adapters.discard(adapter_name)
            if not unit.adapters:
                unit.hook(False)
                del self.units[path]
                self._up.discard(path)  # (its tensors go back to their dtype on the next `apply`)

    def apply(self, loaded: Iterable[str], only_up: bool = False) -> None:
        """Upcast the units of the `loaded` adapters and give every other tensor its own dtype back. With `only_up`,
        nothing is cast down (so that weights can be stashed in float32 before an adapter switch)."""
        loaded = set(loaded)
        needed = {path for path, unit in self.units.items() if unit.adapters & loaded}
        up = needed | self._up if only_up else needed
        up_tensors = {id(t) for path in up for t in self.units[path].tensors()}
        for tensor_id, (tensor, dtype) in self._dtypes.items():
            target = torch.float32 if tensor_id in up_tensors else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
        outermost = {path for path in up if not is_under(path, [other for other in up if other != path])}
        for path, unit in self.units.items():
            unit.hook(path in outermost)
        self._up = up
