"""The units that a batch for several adapters runs group by group, and the weights each group runs them with.

A tuned module holds one adapter's weights (the tuner trains in place), so rows that need other weights there run
that module again with theirs (`torch.func.functional_call`, which leaves the module as it was). `find_units` picks,
for the adapters of one call, the modules that need it:

- block units: each block that one of the adapters tunes as a whole (the outermost modules its `target_modules`
  matched, e.g. `resnet.encoder.stages.0`). A block runs once per group of rows, with everything inside it (its
  convolutions, BatchNorm statistics, activations, residual additions) on that group's rows. Grouping at this level
  costs one cut of the block's input and one join of its output per call: measured on ResNet-50's `stage1` at 16
  adapters in a batch of 32, it is what keeps a mixed batch near one adapter's speed, where cutting and joining around
  each of the block's 21 convolutions and norms moved 20x more activations (`benchmarks/serving.py`);
- module units: each module that owns tuned tensors (a convolution, a norm, a classifier; or the model itself, for a
  tensor such as a timm ViT's `cls_token`), and PEFT's `modules_to_save` wrappers. They run per group where their block
  cannot: when a block's arguments are not all one row per example (a decoder layer's key-value cache, a position
  tensor shared by all rows), the block runs once and each of its tuned modules runs per group instead. A module
  outside every block (a head tied to an embedding) runs per group by itself.

Everything else (the frozen layers outside all the adapters' blocks) runs once over the whole batch.

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from surgical_peft import SurgicalConfig
    >>> base = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1))
    >>> model = get_peft_model(base, SurgicalConfig(target_modules=["0"]), adapter_name="one")
    >>> model.add_adapter("two", SurgicalConfig(target_modules=["2"]))
    >>> units = find_units(model.base_model, ["one", "two"])
    >>> [(unit.path, unit.block) for unit in units]
    [('0', True), ('2', True)]
    >>> units[1].key("two"), units[1].key("one"), units[1].live_key  # "one" is active: unit "2" holds the base
    (('two',), (None,), (None,))
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from peft.utils import ModulesToSaveWrapper
from torch import nn

from ..blocks.paths import is_under
from .memory import DeviceCopies, copies_for

if TYPE_CHECKING:
    from ..tuner.layer import SurgicalLayer
    from ..tuner.model import SurgicalModel

__all__ = ["BASE", "Unit", "find_units"]

BASE = "__base__"
"""The name that stands for the base model in `adapter_names` (PEFT's)."""

_SUM = object()  # a layer that holds the sum of several adapters' deltas: no group's weights are live there


def _entry(layer: SurgicalLayer, name: str) -> str | None:
    """The weights `name` needs in `layer`: its own where it tunes it, else the base (`None`)."""
    return name if name in layer.adapters else None


def _live(layer: SurgicalLayer) -> Hashable:
    """The weights `layer`'s module holds now, as `_entry` names them."""
    if len(layer.loaded) > 1:
        return _SUM
    return layer.loaded[0] if layer.loaded else None


def _differs(layer: SurgicalLayer, names: Sequence[str]) -> bool:
    """Whether some of `names` need other weights in `layer` than its module holds now."""
    return any(_entry(layer, name) != _live(layer) for name in names)


def _choice(wrapper: ModulesToSaveWrapper, name: str) -> str | None:
    """The copy of a `modules_to_save` wrapper that `name` runs: its own, else the original module (`None`)."""
    return name if name in wrapper.modules_to_save else None


class _Holder(nn.Module):
    """Runs a module's own forward (not its `__call__`, whose hooks ran once for the whole batch), so that
    `functional_call` can give it other weights."""

    def __init__(self, module: nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        object.__setattr__(self, "_forward", forward)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(*args, **kwargs)


@dataclass(eq=False)
class Unit:
    """A module that runs once per group of rows that need different weights in it (see the module docstring)."""

    module: nn.Module
    path: str
    block: bool  # a block tuned as a whole, which may leave the split to the module units inside it
    layers: tuple[SurgicalLayer, ...]  # the layers inside it whose weights differ between the call's adapters
    tensors: tuple[tuple[str, int, str], ...]  # (tensor path in the module, layer number, tensor name on the layer)
    wrappers: tuple[tuple[str, ModulesToSaveWrapper], ...]  # PEFT's `modules_to_save` wrappers in it, by path

    @property
    def owns_tuned(self) -> bool:
        """Whether the module's own code uses tuned weights (so its split cannot be left to units inside it)."""
        owned = {name for name, _ in self.module.named_parameters(recurse=False)}
        owned |= {name for name, _ in self.module.named_buffers(recurse=False)}
        return isinstance(self.module, ModulesToSaveWrapper) or any(path in owned for path, _, _ in self.tensors)

    def key(self, name: str) -> Hashable:
        """What the weights `name` needs in this unit are: rows with equal keys run together."""
        return (
            *(_entry(layer, name) for layer in self.layers),
            *(_choice(wrapper, name) for _, wrapper in self.wrappers),
        )

    @property
    def live_key(self) -> Hashable:
        """The key of the weights the unit holds now (a unit with a wrapper always chooses its copy explicitly)."""
        return None if self.wrappers else tuple(_live(layer) for layer in self.layers)

    def weights(self, name: str, tuner: SurgicalModel, per_call: DeviceCopies) -> dict[str, torch.Tensor]:
        """The tuned tensors of the unit with the weights `name` needs, on the device of the live ones."""
        live = dict(self.module.named_parameters(remove_duplicate=False))
        live.update(self.module.named_buffers(remove_duplicate=False))
        weights = {}
        for path, number, tensor_name in self.tensors:
            layer = self.layers[number]
            entry = _entry(layer, name)
            copies = copies_for(tuner, entry, per_call)
            weights[path] = copies.placed(layer.weights(entry)[tensor_name], live[path])
        return weights

    def run(self, name: str, forward: Callable[..., Any], weights: dict[str, torch.Tensor], args: Any, kwargs: Any):
        """The module's forward on one group's rows (`args`, `kwargs`) with the weights of `name`."""
        if isinstance(self.module, ModulesToSaveWrapper):
            chosen = _choice(self.module, name)
            return (self.module.original_module if chosen is None else self.module.modules_to_save[chosen])(
                *args, **kwargs
            )
        if not weights:
            return forward(*args, **kwargs)
        holder = _Holder(self.module, forward)
        held = {f"module.{path}": tensor for path, tensor in weights.items()}
        return torch.func.functional_call(holder, held, args, kwargs, tie_weights=False, strict=False)


def _outermost(paths: Iterable[str]) -> list[str]:
    ordered = sorted(set(paths), key=len)
    kept: list[str] = []
    for path in ordered:
        if not is_under(path, kept):
            kept.append(path)
    return kept


def find_units(tuner: SurgicalModel, names: Sequence[str]) -> list[Unit]:
    """The units for a call whose rows need the weights of `names` (adapters, or `"__base__"`), in module order:
    blocks and tuned modules whose weights differ from what they hold now for some of `names`, and PEFT's
    `modules_to_save` wrappers."""
    layers = [layer for layer in tuner.surgical_layers.values() if _differs(layer, names)]
    sources = {
        id(tensor): (number, name) for number, layer in enumerate(layers) for name, tensor in layer.tensors().items()
    }
    modules = dict(tuner.model.named_modules())
    tuned = [  # every name of every tensor to run with other weights (a tied one under each of its names)
        (path, *sources[id(tensor)])
        for path, tensor in [
            *tuner.model.named_parameters(remove_duplicate=False),
            *tuner.model.named_buffers(remove_duplicate=False),
        ]
        if id(tensor) in sources
    ]
    owners = list(dict.fromkeys(path.rpartition(".")[0] for path, _, _ in tuned))
    wrappers = [path for path, module in modules.items() if isinstance(module, ModulesToSaveWrapper)]
    adapters = {name for name in names if name != BASE} | {name for layer in layers for name in layer.loaded}
    targets = [path for name in adapters for path in tuner.adapter_targets(name) if path in modules]
    blocks = [path for path in _outermost(targets) if _is_under_any(owners, path)]
    chosen = {*blocks, *owners, *wrappers}
    return [_unit(modules, path, path in blocks, layers, tuned, wrappers) for path in modules if path in chosen]


def _is_under_any(paths: Iterable[str], prefix: str) -> bool:
    """Whether one of `paths` lies in `prefix` (or is it)."""
    return any(is_under(path, [prefix]) for path in paths)


def _unit(
    modules: dict[str, nn.Module],
    path: str,
    block: bool,
    layers: list[SurgicalLayer],
    tuned: list[tuple[str, int, str]],
    wrappers: list[str],
) -> Unit:
    """The unit of the module at `path`: the tuned tensors (`tuned`: path in the model, layer number, tensor name)
    and the wrappers (of `wrappers`, paths) inside it."""
    start = len(path) + 1 if path else 0
    found = [(name[start:], number, tensor_name) for name, number, tensor_name in tuned if is_under(name, [path])]
    numbers = sorted({number for _, number, _ in found})
    renumber = {number: position for position, number in enumerate(numbers)}
    return Unit(
        module=modules[path],
        path=path,
        block=block,
        layers=tuple(layers[number] for number in numbers),
        tensors=tuple((name, renumber[number], tensor_name) for name, number, tensor_name in found),
        wrappers=tuple((name[start:], modules[name]) for name in wrappers if is_under(name, [path])),
    )
