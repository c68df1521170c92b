"""One call of a model whose batch holds rows for several adapters: the units (`units.find_units`) run per group of
rows, with each group's weights, and everything else runs once over the whole batch.

`serve` arms the units for the length of a call: each unit's `forward` is replaced (as an instance attribute, removed
again when the call ends, also when it raises) by a runner that cuts the unit's input into groups of rows
(`rows.plan`), runs the unit's own forward once per group with that group's weights (`torch.func.functional_call`,
which puts them in place only for that run), and joins the groups' outputs in row order. Inside a group's run the
units within run as they are: the group's weights are in place. No weight of the model is written, and the active
adapter does not change.

A forward pre-hook on the model checks that its input has as many rows as the call has names (or that many times
the expansion of `generate`'s beams and return sequences).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from surgical_peft import SurgicalConfig
    >>> base = torch.nn.Sequential(torch.nn.Linear(2, 2))
    >>> model = get_peft_model(base, SurgicalConfig(target_modules=["0"], init_weights=False), adapter_name="one")
    >>> x = torch.randn(3, 2)
    >>> with serve(model.base_model, Rows(((BASE,), ("one",), (BASE,)))):
    ...     mixed = model(x)
    >>> with model.disable_adapter():
    ...     base_rows = model(x)
    >>> torch.equal(mixed[[0, 2]], base_rows[[0, 2]]), torch.equal(mixed[1], model(x)[1])
    (True, True)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..blocks.paths import is_under
from ..errors import InputError
from .memory import DeviceCopies
from .rows import Plan, first_rows, join, plan, splittable, take
from .units import BASE, Unit, find_units

if TYPE_CHECKING:
    from ..tuner.model import SurgicalModel

__all__ = ["BASE", "CopyAtInput", "Rows", "serve"]


class CopyAtInput(Exception):
    """Raised where a call that may copy rows (`fan_out`) would have to copy them inside a block, or at a block that
    takes more than one row per example: only copies of the model's whole input are then exact (`fan_out` then runs
    that way). Nothing is changed when it is raised."""


class Rows:
    """The adapters each row of the call's batch stands for (see `rows`), as the units see them: `expanded` is the
    same rows each repeated that many times in a row (`generate`'s beams), and with `copies`, a unit may give a row
    whose adapters need different weights one copy per weights (`fan_out`)."""

    def __init__(self, rows: tuple[tuple[str, ...], ...], expanded: int = 1, copies: bool = False) -> None:
        self.current = rows
        self.expanded = expanded
        self.copies = copies

    def names(self) -> list[str]:
        """Every adapter the rows stand for, once."""
        return list(dict.fromkeys(name for row in self.current for name in row))

    def at(self, count: int, where: str) -> tuple[tuple[str, ...], ...]:
        """The rows of an input of `count` rows; an `InputError` for any other number."""
        if count == len(self.current):
            return self.current
        if self.expanded > 1 and count == len(self.current) * self.expanded:
            return tuple(row for row in self.current for _ in range(self.expanded))
        expected = len(self.current) * self.expanded
        raise InputError(
            f"{where} got {count} rows for {len(self.current)} adapter names"
            f"{f' ({expected} with generate expanding each {self.expanded} times)' if self.expanded > 1 else ''}: "
            "adapter_names takes one name per example of the batch."
        )


class _Call:
    """The state of one call: its rows, units, weights copied to the device, and the group that runs now."""

    def __init__(self, tuner: SurgicalModel, rows: Rows) -> None:
        self.tuner = tuner
        self.rows = rows
        self.units = find_units(tuner, rows.names())
        self.copies = DeviceCopies()
        self.running: tuple[str, Unit] | None = None  # a unit running a group now, and an adapter of the group
        self._plans: dict[tuple[int, tuple[tuple[str, ...], ...]], Plan] = {}
        self._weights: dict[tuple[int, Hashable], dict[str, torch.Tensor]] = {}

    def plan(self, unit: Unit, rows: tuple[tuple[str, ...], ...]) -> Plan:
        cached = (id(unit), rows)
        if cached not in self._plans:
            self._plans[cached] = plan(rows, {name: unit.key(name) for row in rows for name in row})
        return self._plans[cached]

    def weights(self, unit: Unit, key: Hashable, name: str) -> dict[str, torch.Tensor]:
        """The weights of the group `key` (`name` is one of its adapters); none where they are the live ones."""
        if key == unit.live_key:
            return {}
        cached = (id(unit), key)
        if cached not in self._weights:
            self._weights[cached] = unit.weights(name, self.tuner, self.copies)
        return self._weights[cached]

    @contextlib.contextmanager
    def running_group(self, name: str, unit: Unit) -> Iterator[None]:
        self.running = (name, unit)
        try:
            yield
        finally:
            self.running = None

    def run(self, unit: Unit, forward: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """`unit`'s forward over the whole batch: as it is inside a group's run, else once per group of rows."""
        if self.running is not None:
            if not is_under(unit.path, [self.running[1].path]):
                raise InputError(
                    f"A mixed batch cannot run {self.running[1].path or 'the model'} per adapter: it calls "
                    f"{unit.path or 'the model'}, which lies outside it and is tuned too."
                )
            return unit.run(self.running[0], forward, {}, args, kwargs)
        count = first_rows(args, kwargs)
        single = self._single_key(unit)
        if single is not None or count is None:
            name = single if single is not None else self.rows.names()[0]
            return self._run_group(unit, name, forward, args, kwargs)
        where = f"{type(unit.module).__name__} at {unit.path or 'the model'}"
        cut = self.plan(unit, self.rows.at(count, where))
        copies_rows = len(cut.rows) != count
        if copies_rows and not (self.rows.copies and unit.block and splittable((args, kwargs), count)):
            raise CopyAtInput(where)
        if not splittable((args, kwargs), count):
            if unit.block and not unit.owns_tuned:  # its tuned modules split instead
                return forward(*args, **kwargs)
            raise InputError(
                f"A mixed batch cannot run {where} per adapter: its arguments are not all one row per example "
                f"({_describe(args, kwargs)})."
            )
        device = _device(args, kwargs)
        outputs = [
            self._run_group(unit, group.name, forward, take(args, index), take(kwargs, index))
            for group in cut.groups
            for index in [group.index(device)]
        ]
        if copies_rows:
            self.rows.current = cut.rows
        return join(outputs, [len(group.sources) for group in cut.groups], cut.inverse(device))

    def _single_key(self, unit: Unit) -> str | None:
        """An adapter of the call if all of them need the same weights in `unit` (no cut needed), else `None`."""
        names = self.rows.names()
        keys = {unit.key(name) for name in names}
        return names[0] if len(keys) == 1 else None

    def _run_group(self, unit: Unit, name: str, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        weights = self.weights(unit, unit.key(name), name)
        with self.running_group(name, unit):
            return unit.run(name, forward, weights, args, kwargs)


def _device(args: Any, kwargs: Any) -> torch.device:
    for value in [*args, *kwargs.values()]:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _describe(args: tuple, kwargs: dict) -> str:
    described = [
        f"{name}: {tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}"
        for name, value in [*((f"argument {i}", arg) for i, arg in enumerate(args)), *kwargs.items()]
    ]
    return ", ".join(described[:4]) + (f", ... ({len(described)} in all)" if len(described) > 4 else "")


def _runner(call: _Call, unit: Unit, forward: Callable[..., Any]) -> Callable[..., Any]:
    @torch.compiler.disable  # the groups depend on the names: run eagerly under torch.compile (a graph break)
    def run_unit(*args: Any, **kwargs: Any) -> Any:
        return call.run(unit, forward, args, kwargs)

    return run_unit


def _check_rows(call: _Call) -> Callable[..., None]:
    def check(module: nn.Module, args: tuple, kwargs: dict) -> None:
        count = first_rows(args, kwargs)
        if count is not None:
            call.rows.at(count, "The model's input")

    return check


@contextlib.contextmanager
def serve(tuner: SurgicalModel, rows: Rows) -> Iterator[Rows]:
    """Within this block, a call of `tuner`'s model runs each row with the weights of the adapters `rows` gives it.
    Yields `rows`, whose `current` are the rows of the model's output once the call is done."""
    call = _Call(tuner, rows)
    armed: list[tuple[nn.Module, Any]] = []
    hook = tuner.model.register_forward_pre_hook(_check_rows(call), with_kwargs=True)
    try:
        for unit in call.units:
            own = unit.module.__dict__.get("forward")  # an instance forward (e.g. accelerate's hooks), if any
            armed.append((unit.module, own))
            unit.module.forward = _runner(call, unit, own or unit.module.forward)
        yield rows
    finally:
        hook.remove()
        for module, own in reversed(armed):
            if own is None:
                del module.forward
            else:
                module.forward = own
