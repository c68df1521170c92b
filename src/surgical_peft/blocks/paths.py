"""Module and tensor paths (`"resnet.encoder.stages.0"`, `"classifier.1.weight"`): prefixes, joins, and the keys under
which an `nn.ModuleDict` can hold them (module names may not contain dots).

Example:
    >>> from surgical_peft.blocks.paths import from_key, is_under, to_key
    >>> is_under("classifier.1.weight", ["classifier"]), is_under("classifiers.1", ["classifier"])
    (True, False)
    >>> to_key("resnet.embedder"), from_key("resnet/embedder")
    ('resnet/embedder', 'resnet.embedder')
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["from_key", "is_under", "join", "to_key"]


def is_under(path: str, prefixes: Iterable[str]) -> bool:
    """Whether `path` (a module or tensor path) is one of `prefixes` or lies inside one of them (everything lies
    inside `""`, the model itself).

    Example:
        >>> is_under("resnet.encoder.stages.0.layers.0", ["resnet.encoder.stages.0"])
        True
        >>> is_under("resnet.encoder.stages.10", ["resnet.encoder.stages.1"]), is_under("classifier.1", [""])
        (False, True)
    """
    return any(not prefix or path == prefix or path.startswith(prefix + ".") for prefix in prefixes)


def join(prefix: str, name: str) -> str:
    """`prefix.name`, or `name` at the top level (`prefix == ""`)."""
    return f"{prefix}.{name}" if prefix else name


def to_key(path: str) -> str:
    """`path` as an `nn.ModuleDict` key."""
    return path.replace(".", "/")


def from_key(key: str) -> str:
    """The path an `nn.ModuleDict` key made by `to_key` stands for."""
    return key.replace("/", ".")
