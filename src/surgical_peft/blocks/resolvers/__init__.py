"""Block resolvers: each reads the blocks of one family of models from their structure.

A resolver is an object with a `name` and an `entries(model)` method returning the model's `BlockEntry`s in forward
order, or `None` when the model is not of its family. `list_blocks` asks `RESOLVERS` in order and takes the first
answer; the generic fallback, last, answers for any model. Adding a family is adding a module here and its resolver to
`RESOLVERS`, before the ones it is more specific than.

Example:
    >>> [resolver.name for resolver in RESOLVERS]
    ['timm', 'transformers', 'generic']
"""

from __future__ import annotations

from typing import Protocol

from torch import nn

from ..block_map import BlockEntry
from .generic import GenericResolver
from .timm import TimmResolver
from .transformers import TransformersResolver

__all__ = ["RESOLVERS", "BlockResolver"]


class BlockResolver(Protocol):
    """What `list_blocks` asks of a resolver."""

    name: str
    structural: bool  # False only for the fallback, whose blocks are top-level modules rather than a model's design

    def entries(self, model: nn.Module) -> list[BlockEntry] | None: ...


RESOLVERS: tuple[BlockResolver, ...] = (TimmResolver(), TransformersResolver(), GenericResolver())
"""The resolvers `list_blocks` asks, in order (timm first: transformers' TimmWrapper is a transformers model)."""
