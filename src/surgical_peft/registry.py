"""`Registry`: a family of named objects (training strategies, block-ranking criteria), one module per member.

A member is a module of the registry's package whose name does not start with an underscore; its name is the
module's, with `-` for `_` (`lp_ft.py` is `"lp-ft"`), and the object is the module's attribute named by the registry
(e.g. `STRATEGY`). Members are found without importing them and imported on first use, so adding one is adding a
file, and a member may depend on modules that depend on the registry (the sweep criterion on the training loop).
`literal` reads a constant a member's source spells out (e.g. a strategy's `description`), still without importing
it, for the command line's help.

Example:
    >>> from surgical_peft.criteria import CRITERIA
    >>> CRITERIA.names
    ('greedy', 'rgn', 'snr', 'sweep')
    >>> CRITERIA.get("rgn").description.startswith("Auto-RGN")
    True
    >>> CRITERIA.literal("rgn", "description") == CRITERIA.get("rgn").description
    True
    >>> CRITERIA.get("random")
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: Unknown criterion 'random'. Valid: greedy, rgn, snr, sweep.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Generic, TypeVar

from .errors import InputError

__all__ = ["Registry"]

T = TypeVar("T")


def _assigns(node: ast.AST, name: str) -> bool:
    """Whether `node` is `name = ...`, `name: type = ...` or the argument `name=...` of a call."""
    if isinstance(node, ast.Assign):
        return any(isinstance(target, ast.Name) and target.id == name for target in node.targets)
    if isinstance(node, ast.keyword):
        return node.arg == name
    return isinstance(node, ast.AnnAssign) and node.value is not None and getattr(node.target, "id", None) == name


def _source(info: pkgutil.ModuleInfo) -> Path:
    """The file that holds a module's source (a package's `__init__.py`)."""
    folder = Path(info.module_finder.path)  # type: ignore[union-attr]
    return folder / info.name / "__init__.py" if info.ispkg else folder / f"{info.name}.py"


class Registry(Generic[T]):
    """The members of `package` (found in `path`), each the attribute `attribute` of its module.

    Args:
        package: the package's name (`__name__` in its `__init__.py`).
        path: where its modules are (`__path__` there).
        kind: what a member is, for error messages (e.g. `"strategy"`).
        attribute: the module attribute that holds the member.

    Example:
        >>> import surgical_peft.training.strategies as package
        >>> strategies = Registry(package.__name__, package.__path__, kind="strategy", attribute="STRATEGY")
        >>> "lp-ft" in strategies.names, strategies.literal("full", "description")
        (True, 'every block')
        >>> strategies.check("lp_ft")
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: Unknown strategy 'lp_ft'. Valid: ...
    """

    def __init__(self, package: str, path: Iterable[str], *, kind: str, attribute: str) -> None:
        self.package = package
        self.kind = kind
        self.attribute = attribute
        found = sorted(
            (info.name, _source(info)) for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_")
        )
        self._modules = {module.replace("_", "-"): module for module, _ in found}
        self._sources = dict(found)

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

    def literal(self, name: str, attribute: str) -> Any:
        """The literal the member `name`'s source gives `attribute` (first found: in the module, a class body, or a
        call's keyword argument, e.g. `description = "the blocks only"`), read without importing the member or what it
        imports.

        Raises:
            LookupError: if the source assigns nothing to `attribute`.
            ValueError: if what it assigns is not a literal.
        """
        source = self._sources[self._modules[self.check(name)]]
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if _assigns(node, attribute):
                return ast.literal_eval(node.value)
        raise LookupError(f"{source} assigns nothing to {attribute!r}.")

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self._modules)})"
