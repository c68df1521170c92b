"""Blocks of transformers vision backbones, read from their structure (ResNet, ConvNeXt, Swin, ViT, DeiT, BEiT, DINOv2
and others of the same shape).

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
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> [entry.name for entry in TransformersResolver().entries(model)]
    ['embedder', 'stage1', 'stage2', 'head']
"""

from __future__ import annotations

from torch import nn

from ..block_map import BlockEntry, num_parameters
from ..names import HEAD
from ..paths import is_under, join

__all__ = ["TransformersResolver"]

# A repeated-block list is the backbone's main body only if it holds at least this share of the container's
# parameters; smaller lists are details of a stem or a head (e.g. a ModuleList of two convolutions).
_MIN_SHARE_OF_REPEATED_BLOCKS = 0.5


def _repeated_blocks(
    container: nn.Module, container_path: str, max_depth: int = 2
) -> tuple[str, nn.ModuleList] | None:
    """The `nn.ModuleList` inside `container` (searched breadth-first, `max_depth` levels) that holds its main body."""
    total = num_parameters(container)
    frontier = [(container_path, container)]
    for _ in range(max_depth + 1):
        next_frontier = []
        for path, module in frontier:
            if (
                isinstance(module, nn.ModuleList)
                and total
                and num_parameters(module) / total >= _MIN_SHARE_OF_REPEATED_BLOCKS
            ):
                return path, module
            next_frontier.extend((join(path, name), child) for name, child in module.named_children())
        frontier = next_frontier
    return None


def _is_norm(module: nn.Module) -> bool:
    return "norm" in type(module).__name__.lower()


def _backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The backbone (`model.base_model_prefix`) and its path; the model itself when it has none."""
    prefix = getattr(model, "base_model_prefix", "")
    backbone = getattr(model, prefix, None) if prefix else None
    return (backbone, prefix) if isinstance(backbone, nn.Module) else (model, "")


def _repeated_entries(list_path: str, layers: nn.ModuleList) -> list[BlockEntry]:
    entries = []
    for index, layer in enumerate(layers, start=1):
        kind = "stage" if "stage" in f"{list_path.rsplit('.', 1)[-1]} {type(layer).__name__}".lower() else "layer"
        entries.append(BlockEntry(f"{kind}{index}", (join(list_path, str(index - 1)),), num_parameters(layer)))
    return entries


def _outside_list(child: nn.Module, child_path: str, list_path: str, layers: nn.ModuleList) -> list[BlockEntry]:
    """Parameterised modules of a container outside its repeated-block list, e.g. an encoder-level norm."""
    entries = []
    for name, module in child.named_modules(prefix=child_path):
        if module is layers or not any(True for _ in module.parameters(recurse=False)):
            continue
        if not is_under(name, [list_path]):
            entries.append(BlockEntry(name.rsplit(".", 1)[-1], (name,), num_parameters(module)))
    return entries


def _head(model: nn.Module, backbone: nn.Module) -> list[BlockEntry]:
    """The task model's other parameterised children. Parameters tied to the backbone's (GPT-2's `lm_head` is its
    `wte`) belong to the backbone's block: a head made only of them is no block of its own."""
    tied = {id(parameter) for parameter in backbone.parameters()}
    head = [(name, child) for name, child in model.named_children() if child is not backbone]
    head = [(name, child) for name, child in head if any(id(p) not in tied for p in child.parameters())]
    if not head:
        return []
    return [BlockEntry(HEAD, tuple(name for name, _ in head), sum(num_parameters(child) for _, child in head))]


class TransformersResolver:
    """A stem, the `nn.ModuleList` that holds most of the backbone, trailing norms, and the task head."""

    name = "transformers"
    structural = True

    def entries(self, model: nn.Module) -> list[BlockEntry] | None:
        backbone, prefix = _backbone(model)
        entries: list[BlockEntry] = []
        found_repeated_blocks = False
        for child_name, child in backbone.named_children():
            child_path = join(prefix, child_name)
            child_size = num_parameters(child)
            if child_size == 0:
                continue
            repeated = _repeated_blocks(child, child_path)
            if repeated is None:
                entries.append(BlockEntry("norm" if _is_norm(child) else child_name, (child_path,), child_size))
                continue
            found_repeated_blocks = True
            list_path, layers = repeated
            entries += _repeated_entries(list_path, layers)
            if sum(num_parameters(layer) for layer in layers) != child_size:
                entries += _outside_list(child, child_path, list_path, layers)
        if not found_repeated_blocks:
            return None
        return entries + (_head(model, backbone) if backbone is not model else [])
