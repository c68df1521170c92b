"""Train/eval modes held for a while and restored afterwards, whatever happens in between.

Example:
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
    >>> with held_in_eval([model]):
    ...     model.training, model[1].training
    (False, False)
    >>> model.training, model[1].training
    (True, True)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["held_in_eval"]


@contextmanager
def held_in_eval(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Every module in `modules` and below them in eval mode for the duration; their modes restored afterwards."""
    modes = [(module, module.training) for top in modules for module in top.modules()]
    for module, _ in modes:
        module.training = False
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
