"""Serving tuned adapters: mixed-adapter batches through PEFT's `adapter_names` (`mixed.py`), one input through
several adapters (`surgical_peft.fan_out`, in `fan_out.py`), and where adapter weights live meanwhile (`memory.py`).
The rows of such a batch (`rows.py`) run through the tuned blocks group by group (`units.py`, `session.py`); nothing
here writes a weight or changes the active adapter. (Compiling once and switching freely is the tuner's business:
`surgical_peft.tuner._internals.read_adapter_lookups_eagerly`.)

Example:
    >>> import surgical_peft.serving as serving
    >>> serving.__all__
    ['keep_on_device']
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = ["keep_on_device"]

_LAZY = {"keep_on_device": "memory"}

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
