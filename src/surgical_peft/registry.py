"""`Registry`: a family of named objects (training strategies, block-ranking criteria), one module per member.

A member is a module of the registry's package whose name does not start with an underscore; its name is the
module's, with `-` for `_` (`lp_ft.py` is `"lp-ft"`), and the object is the module's attribute named by the registry
(e.g. `STRATEGY`). Members are found without importing them and imported on first use, so adding one is adding a
file, and a member may depend on modules that depend on the registry (the sweep criterion on the training loop).

Example:
    >>> from surgical_peft.criteria import CRITERIA
    >>> CRITERIA.names
    ('greedy', 'rgn', 'snr', 'sweep')
    >>> CRITERIA.get("rgn").description.startswith("Auto-RGN")
    True
    >>> CRITERIA.get("random")
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: Unknown criterion 'random'. Valid: greedy, rgn, snr, sweep.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable
from typing import Generic, TypeVar

from .errors import InputError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """The members of `package` (found in `path`), each the attribute `attribute` of its module.

    Args:
        package: the package's name (`__name__` in its `__init__.py`).
        path: where its modules are (`__path__` there).
        kind: what a member is, for error messages (e.g. `"strategy"`).
        attribute: the module attribute that holds the member.
    """

    def __init__(self, package: str, path: Iterable[str], *, kind: str, attribute: str) -> None:
        self.package = package
        self.kind = kind
        self.attribute = attribute
        modules = sorted(info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_"))
        self._modules = {module.replace("_", "-"): module for module in modules}

    @property
    def names(self) -> tuple[str, ...]:
        """The members' names, sorted."""
        return tuple(self._modules)

    def check(self, name: str) -> str:
        """`name`, if it is a member; an `InputError` naming the valid ones otherwise."""
        if name not in self._modules:
            raise InputError(f"Unknown {self.kind} {name!r}. Valid: {', '.join(self._modules)}.")
        return name

    def get(self, name: str) -> T:
        """The member `name` (its module is imported the first time)."""
        module = importlib.import_module(f"{self.package}.{self._modules[self.check(name)]}")
        return getattr(module, self.attribute)

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._modules)})"
