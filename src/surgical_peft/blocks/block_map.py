"""`BlockMap`: a model's blocks in forward order (name -> module paths), with parameter counts.

Example:
    >>> from surgical_peft.blocks.block_map import BlockEntry, BlockMap
    >>> blocks = BlockMap("Net", [BlockEntry("stem", ("conv",), 80), BlockEntry("head", ("fc",), 20)], structural=True)
    >>> blocks.target_modules(["head"]), blocks.block_of("fc.weight")
    (['fc'], 'head')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from torch import nn

from ..errors import InputError, few
from .paths import is_under

__all__ = ["BlockEntry", "BlockMap", "format_bytes", "format_count", "num_parameters", "parameters_under"]


class BlockEntry(NamedTuple):
    """One block: its name, the module paths it holds (or tensor paths, for tensors a container owns directly, such
    as a ViT's `cls_token`) and their number of parameters.

    Example:
        >>> entry = BlockEntry("embeddings", ("vit.embeddings.patch_embeddings", "vit.embeddings.cls_token"), 3_088)
        >>> entry.name, entry.num_parameters
        ('embeddings', 3088)
        >>> BlockMap("ViT", [entry], structural=True).block_of("vit.embeddings.cls_token")
        'embeddings'
    """

    name: str
    modules: tuple[str, ...]
    num_parameters: int


def num_parameters(module: nn.Module) -> int:
    """Number of parameters of `module` and its children."""
    return sum(parameter.numel() for parameter in module.parameters())


def parameters_under(model: nn.Module, paths: Iterable[str]) -> dict[str, nn.Parameter]:
    """The parameters of `model` under `paths` (module paths, or tensor paths such as a ViT's `"cls_token"`).

    Example:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
        >>> list(parameters_under(model, ["1", "0.bias"]))
        ['0.bias', '1.weight', '1.bias']
    """
    paths = list(paths)
    return {name: parameter for name, parameter in model.named_parameters() if is_under(name, paths)}


def format_count(count: int) -> str:
    """`count` with a K/M/B suffix, e.g. `'1.2K'`.

    Example:
        >>> format_count(950), format_count(1_234), format_count(86_567_656), format_count(2_000_000_000)
        ('950', '1.2K', '86.6M', '2.0B')
    """
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return str(count)


def format_bytes(count: int) -> str:
    """A size in bytes in kB or MB, e.g. `'1.2 kB'` (an adapter's size on disk).

    Example:
        >>> format_bytes(80), format_bytes(12_345), format_bytes(1_234_567)
        ('0.1 kB', '12.3 kB', '1.23 MB')
    """
    return f"{count / 1e6:.2f} MB" if count >= 1e5 else f"{count / 1e3:.1f} kB"


class BlockMap(dict[str, tuple[str, ...]]):
    """Ordered mapping of block name -> module paths, in forward order, with parameter counts.

    `str(block_map)` is a readable table. `structural` is `False` when the model has no known block structure and the
    map is the generic fallback (one entry per parameterised top-level module).

    Example:
        >>> from torch import nn
        >>> from surgical_peft import list_blocks
        >>> blocks = list_blocks(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)))
        >>> dict(blocks), blocks.structural
        ({'0': ('0',), '2': ('2',)}, False)
    """

    def __init__(self, model_name: str, entries: Iterable[BlockEntry], structural: bool) -> None:
        entries = list(entries)
        super().__init__((name, modules) for name, modules, _ in entries)
        self.model_name = model_name
        self.num_parameters: dict[str, int] = {name: count for name, _, count in entries}
        self.structural = structural

    def target_modules(self, blocks: Sequence[str]) -> list[str]:
        """Module paths of `blocks`, in forward order; unknown names raise an `InputError` listing the valid ones."""
        unknown = [block for block in blocks if block not in self]
        if unknown:
            raise InputError(f"Unknown block {few(unknown)} for {self.model_name}. Valid blocks: {', '.join(self)}.")
        return [module for block in self for module in self[block] if block in blocks]

    def block_of(self, module_path: str) -> str | None:
        """Name of the block that holds `module_path` (a module or tensor path), or `None`."""
        for block, modules in self.items():
            if is_under(module_path, modules):
                return block
        return None

    def __str__(self) -> str:
        total = sum(self.num_parameters.values())
        width = max([5, *(len(name) for name in self)])
        lines = [f"{self.model_name}: {len(self)} blocks, {format_count(total)} parameters"]
        lines.append(f"  {'block':<{width}}  {'params':>8}  {'share':>6}  modules")
        for name, modules in self.items():
            count = self.num_parameters[name]
            share = 100 * count / total if total else 0.0
            lines.append(f"  {name:<{width}}  {format_count(count):>8}  {share:5.1f}%  {', '.join(modules)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)
