"""The fallback for any `nn.Module`: one block per parameterised top-level module (below single-child wrappers), and
one per parameter the top-level container holds directly beside them.

Such blocks are not a design's blocks, so block names cannot be resolved on them; they tell a user what to pass as
`SurgicalConfig(target_modules=...)`.

Example:
    >>> from torch import nn
    >>> [entry.name for entry in GenericResolver().entries(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)))]
    ['0', '2']
"""

from __future__ import annotations

from torch import nn

from ..block_map import BlockEntry, num_parameters
from ..paths import join

__all__ = ["GenericResolver"]


class GenericResolver:
    """Every parameterised child of the model (after descending through single-child wrappers) as its own block."""

    name = "generic"
    structural = False

    def entries(self, model: nn.Module) -> list[BlockEntry]:
        path, module = "", model
        while True:
            parameterised = [(n, c) for n, c in module.named_children() if num_parameters(c) > 0]
            if len(parameterised) != 1 or any(True for _ in module.parameters(recurse=False)):
                break
            name, module = parameterised[0]
            path = join(path, name)
        if not parameterised:  # a single layer: the block is the whole of it
            return [BlockEntry(path or type(module).__name__, (path,), num_parameters(module))]
        own = [  # parameters a container holds beside its children (e.g. a cls_token): a block each
            BlockEntry(join(path, n), (join(path, n),), p.numel()) for n, p in module.named_parameters(recurse=False)
        ]
        return own + [BlockEntry(join(path, n), (join(path, n),), num_parameters(c)) for n, c in parameterised]
