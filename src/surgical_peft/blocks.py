"""Blocks: the contiguous groups of layers that surgical fine-tuning tunes one at a time.

A block map is read from the model's structure, never from hard-coded module paths, so it survives transformers
moving modules around between versions. Vision backbones on the Hub share one shape:

    <task model>            e.g. ResNetForImageClassification
      <backbone>            found through `model.base_model_prefix` (resnet, vit, convnext, swin, ...)
        <stem>              ResNet `embedder`, ViT `embeddings`, ...
        <repeated blocks>   an `nn.ModuleList` (possibly inside an `encoder`) holding most of the backbone's
                            parameters: ResNet/ConvNeXt/Swin stages, ViT/DeiT/BEiT/DINOv2 layers
        <final norm/pooler> ViT `layernorm`, BEiT `pooler`, ...
      <head>                every other parameterised child of the task model (`classifier`, ...)

Blocks are named after what they hold: the stem and trailing modules keep their attribute name (a normalisation layer
is called `norm`), repeated blocks are `stage1..N` when the list or its items are called stages (ResNet, ConvNeXt,
Swin) and `layer1..N` otherwise (ViT, DeiT, BEiT, DINOv2), and the task head is `head`.

Example:
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import list_blocks
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> list(list_blocks(model))
    ['embedder', 'stage1', 'stage2', 'head']
    >>> list_blocks(model)["stage2"]
    ('resnet.encoder.stages.1',)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from accelerate.utils import extract_model_from_parallel
from torch import nn

__all__ = ["BlockMap", "list_blocks"]

# A repeated-block list is the backbone's main body only if it holds at least this share of the container's
# parameters; smaller lists are details of a stem or a head (e.g. a ModuleList of two convolutions).
_MIN_SHARE_OF_REPEATED_BLOCKS = 0.5


def _num_parameters(module: nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _format_count(count: int) -> str:
    for divisor, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= divisor:
            return f"{count / divisor:.1f}{suffix}"
    return str(count)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters a block map names: DDP, DataParallel and `PeftModel` wrappers removed."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether `path` (a module or tensor path) is one of `prefixes` or lies inside one of them."""
    return any(path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


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

    def __init__(self, model_name: str, entries: Iterable[tuple[str, tuple[str, ...], int]], structural: bool) -> None:
        entries = list(entries)
        super().__init__((name, modules) for name, modules, _ in entries)
        self.model_name = model_name
        self.num_parameters: dict[str, int] = {name: count for name, _, count in entries}
        self.structural = structural

    def target_modules(self, blocks: Sequence[str]) -> list[str]:
        """Module paths of `blocks`, in forward order; unknown names raise a `ValueError` listing the valid ones."""
        unknown = [block for block in blocks if block not in self]
        if unknown:
            raise ValueError(
                f"Unknown block {', '.join(map(repr, unknown))} for {self.model_name}. "
                f"Valid blocks: {', '.join(self)}."
            )
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
        lines = [f"{self.model_name}: {len(self)} blocks, {_format_count(total)} parameters"]
        lines.append(f"  {'block':<{width}}  {'params':>8}  {'share':>6}  modules")
        for name, modules in self.items():
            count = self.num_parameters[name]
            share = 100 * count / total if total else 0.0
            lines.append(f"  {name:<{width}}  {_format_count(count):>8}  {share:5.1f}%  {', '.join(modules)}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return str(self)


def _repeated_blocks(
    container: nn.Module, container_path: str, max_depth: int = 2
) -> tuple[str, nn.ModuleList] | None:
    """The `nn.ModuleList` inside `container` (searched breadth-first, `max_depth` levels) that holds its main body."""
    total = _num_parameters(container)
    frontier = [(container_path, container)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for path, module in frontier:
            if (
                isinstance(module, nn.ModuleList)
                and total
                and _num_parameters(module) / total >= _MIN_SHARE_OF_REPEATED_BLOCKS
            ):
                return path, module
            next_frontier.extend((_join(path, name), child) for name, child in module.named_children())
        frontier = next_frontier
    return None


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _structural_entries(model: nn.Module) -> list[tuple[str, tuple[str, ...], int]] | None:
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    if not isinstance(backbone, nn.Module):
        backbone, prefix = model, ""

    entries: list[tuple[str, tuple[str, ...], int]] = []
    found_repeated_blocks = False
    for child_name, child in backbone.named_children():
        child_path = _join(prefix, child_name)
        child_size = _num_parameters(child)
        if child_size == 0:
            continue
        repeated = _repeated_blocks(child, child_path)
        if repeated is None:
            name = "norm" if _is_norm(child) else child_name
            entries.append((name, (child_path,), child_size))
            continue
        found_repeated_blocks = True
        list_path, layers = repeated
        covered = 0
        for index, layer in enumerate(layers, start=1):
            kind = "stage" if "stage" in f"{list_path.rsplit('.', 1)[-1]} {type(layer).__name__}".lower() else "layer"
            entries.append((f"{kind}{index}", (_join(list_path, str(index - 1)),), _num_parameters(layer)))
            covered += _num_parameters(layer)
        if covered != child_size:  # parameters of the container outside the list, e.g. an encoder-level norm
            for name, module in child.named_modules(prefix=child_path):
                if module is layers or not any(True for _ in module.parameters(recurse=False)):
                    continue
                if not name.startswith(list_path + "."):
                    entries.append((name.rsplit(".", 1)[-1], (name,), _num_parameters(module)))

    if not found_repeated_blocks:
        return None
    if backbone is not model:
        head = [(name, child) for name, child in model.named_children() if child is not backbone]
        head = [(name, child) for name, child in head if _num_parameters(child) > 0]
        if head:
            entries.append(("head", tuple(name for name, _ in head), sum(_num_parameters(c) for _, c in head)))
    return entries


def _generic_entries(model: nn.Module) -> list[tuple[str, tuple[str, ...], int]]:
    # Descend through single-child wrappers, then list every parameterised child as its own block.
    path, module = "", model
    while True:
        parameterised = [(n, c) for n, c in module.named_children() if _num_parameters(c) > 0]
        if len(parameterised) != 1 or any(True for _ in module.parameters(recurse=False)):
            break
        name, module = parameterised[0]
        path = _join(path, name)
    entries = [(_join(path, n), (_join(path, n),), _num_parameters(c)) for n, c in parameterised]
    own = [name for name, _ in module.named_parameters(recurse=False)]
    if own:  # parameters held directly (no child module to target): the container itself is the block
        return [(path or type(module).__name__, (path,), _num_parameters(module))]
    return entries


def list_blocks(model: nn.Module) -> BlockMap:
    """The model's blocks in forward order: block name -> module paths, with parameter counts.

    Works on any `nn.Module`; for transformers vision backbones (ResNet, ViT, DeiT, BEiT, DINOv2, ConvNeXt, Swin and
    others of the same shape) the map is structural (see the module docstring), otherwise it lists the parameterised
    top-level modules, which can be passed as `SurgicalConfig(target_modules=...)`.

    Args:
        model: the model, or a `PeftModel` (or DDP) wrapping it.

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from surgical_peft import list_blocks
        >>> config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        ...                    num_attention_heads=2, intermediate_size=32)
        >>> list(list_blocks(ViTForImageClassification(config)))
        ['embeddings', 'layer1', 'layer2', 'norm', 'head']
    """
    model = unwrap_model(model)
    entries = _structural_entries(model)
    structural = entries is not None
    if entries is None:
        entries = _generic_entries(model)
    return BlockMap(type(model).__name__, entries, structural=structural)
