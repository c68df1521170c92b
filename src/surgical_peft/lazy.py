"""Names a package imports on first use (PEP 562), so that importing the package stays light.

Example:
    >>> __getattr__, __dir__ = lazy_names("surgical_peft.training", {"fine_tune": "loop"}, {"__all__": ["fine_tune"]})
    >>> __getattr__("fine_tune").__name__, __dir__()
    ('fine_tune', ['__all__', 'fine_tune'])
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_names"]


def lazy_names(
    package: str, modules: Mapping[str, str], namespace: Mapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level `__getattr__` and `__dir__` of `package`: each name in `modules` is read from its submodule
    (`modules[name]`, relative to `package`) when first asked for; `namespace` is the package's `globals()`."""

    def __getattr__(name: str) -> Any:
        if name in modules:
            return getattr(importlib.import_module(f".{modules[name]}", package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *namespace.get("__all__", ())})

    return __getattr__, __dir__
