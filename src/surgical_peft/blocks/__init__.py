"""Blocks: the contiguous groups of layers that surgical fine-tuning tunes one at a time.

A block map is read from the model's structure, never from hard-coded module paths, so it survives transformers
moving modules around between versions. One resolver per family of models (`surgical_peft.blocks.resolvers`) reads
it; `list_blocks` asks them in turn. Its names are imported on first use, so that `names` (the special block names the
command line's options read) loads without torch.

Example:
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft.blocks import list_blocks
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> print(list_blocks(model))  # doctest: +NORMALIZE_WHITESPACE
    ResNetForImageClassification: 4 blocks, 1.8K parameters
      block       params   share  modules
      embedder      1.2K   67.5%  resnet.embedder
      stage1          92    5.2%  resnet.encoder.stages.0
      stage2         448   25.4%  resnet.encoder.stages.1
      head            34    1.9%  classifier
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = [
    "ALL",
    "AUTO",
    "HEAD",
    "SPECIAL",
    "BlockEntry",
    "BlockMap",
    "format_bytes",
    "format_count",
    "is_under",
    "list_blocks",
    "unwrap_model",
]

_LAZY = {
    "ALL": "names",
    "AUTO": "names",
    "HEAD": "names",
    "SPECIAL": "names",
    "BlockEntry": "block_map",
    "BlockMap": "block_map",
    "format_bytes": "block_map",
    "format_count": "block_map",
    "is_under": "paths",
    "list_blocks": "listing",
    "unwrap_model": "listing",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
