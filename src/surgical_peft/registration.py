"""Registers the `"SURGICAL"` PEFT type as soon as PEFT is imported, without importing PEFT (or torch) itself.

`import surgical_peft` promises that `peft.get_peft_model`, `PeftModel.from_pretrained`, `PeftConfig.from_pretrained`
and `AutoPeftModel*.from_pretrained` know the type, in whichever order the two packages are imported; yet importing
PEFT costs seconds, which `surgical-peft --help` must not pay. So `register_with_peft` registers at once when PEFT is
already imported, and otherwise puts a finder in front of `sys.meta_path` that waits for `peft`: once PEFT's own
`__init__` has run, the finder takes itself out and imports `surgical_peft.tuner`, whose import does the registration
(once per process). Nothing else about PEFT's import changes: its spec and loader are PEFT's own.

Example:
    >>> import sys
    >>> import surgical_peft
    >>> from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    >>> "SURGICAL" in PEFT_TYPE_TO_CONFIG_MAPPING, "surgical_peft.tuner" in sys.modules
    (True, True)
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["register_with_peft"]

_PEFT = "peft"
_TUNER = "surgical_peft.tuner"  # importing it registers the type


class _AfterPeft(MetaPathFinder):
    """Finds nothing itself: hands out PEFT's own spec, with the registration run right after PEFT's module body."""

    def find_spec(self, name: str, path: Sequence[str] | None, target: ModuleType | None = None) -> ModuleSpec | None:
        if name != _PEFT:
            return None
        spec = _find_elsewhere(self, name, path, target)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            _register_after(spec.loader, self)
        return spec


def _find_elsewhere(
    finder: MetaPathFinder, name: str, path: Sequence[str] | None, target: ModuleType | None
) -> ModuleSpec | None:
    """The spec the other finders of `sys.meta_path` give for `name` (what the import would use without `finder`)."""
    for other in list(sys.meta_path):
        if other is not finder and hasattr(other, "find_spec"):
            spec = other.find_spec(name, path, target)
            if spec is not None:
                return spec
    return None


def _register_after(loader: object, finder: _AfterPeft) -> None:
    """Run the registration after `loader` executes its module (a spec may be found without being loaded, e.g. by
    `importlib.util.find_spec`, so the finder stays until PEFT really runs)."""
    exec_module = loader.exec_module  # type: ignore[attr-defined]

    def exec_then_register(module: ModuleType) -> None:
        del loader.exec_module  # type: ignore[attr-defined]  # the loader's own method again
        _remove(finder)
        exec_module(module)
        importlib.import_module(_TUNER)

    loader.exec_module = exec_then_register  # type: ignore[attr-defined]


def _remove(finder: MetaPathFinder) -> None:
    if finder in sys.meta_path:
        sys.meta_path.remove(finder)


def register_with_peft() -> None:
    """Register the `"SURGICAL"` type with PEFT now if PEFT is imported, else right after PEFT is (once).

    Example:
        >>> register_with_peft()  # a second call changes nothing
        >>> sum(isinstance(finder, _AfterPeft) for finder in sys.meta_path)
        0
    """
    if _PEFT in sys.modules:
        importlib.import_module(_TUNER)
    elif not any(isinstance(finder, _AfterPeft) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeft())
