"""The rows of a batch that holds examples for several adapters: which rows a tuned unit runs with which weights
(`plan`), and the nested arguments and outputs of a call cut into groups of rows and joined back (`take`, `join`).

Each row of the batch stands for the adapters whose output it carries: one in a mixed batch (PEFT's `adapter_names`),
all of them at first in `fan_out`, where a row is copied into several once their weights differ (`plan`). Arguments
and outputs are nested tuples, lists and dicts (transformers' `ModelOutput` too) of tensors, whose first dimension is
the row, and of plain values (`None`, numbers, strings), which are the same for every row.

Example:
    >>> import torch
    >>> rows = (("a",), ("b",), ("a",))
    >>> cut = plan(rows, {"a": "key-a", "b": "key-b"})
    >>> [(group.key, group.sources) for group in cut.groups], cut.order
    ([('key-a', (0, 2)), ('key-b', (1,))], (0, 2, 1))
    >>> batch = torch.arange(3.0)
    >>> outputs = [take(batch, group.index(batch.device)) * 10 for group in cut.groups]
    >>> join(outputs, [len(group.sources) for group in cut.groups], cut.inverse(batch.device))
    tensor([ 0., 10., 20.])
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError

__all__ = ["Group", "Plan", "as_index", "first_rows", "join", "leaves", "plan", "splittable", "take"]

Rows = tuple[tuple[str, ...], ...]
"""For each row of a batch, the adapters whose output it carries."""

_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass(frozen=True)
class Group:
    """Rows that run through a unit together, with the weights `key` stands for; `name` is one of their adapters."""

    key: Hashable
    name: str
    sources: tuple[int, ...]  # the rows of the unit's input they take, in order (a row may be in several groups)

    def index(self, device: torch.device) -> slice | torch.Tensor:
        """`sources` as an index of the first dimension (`as_index`)."""
        return as_index(self.sources, device)


@dataclass(frozen=True)
class Plan:
    """How one call of a unit runs: its groups, the rows after it, and the order of the groups' joined outputs."""

    groups: tuple[Group, ...]
    rows: Rows
    order: tuple[int, ...]  # the row (after the unit) of each row of the groups' outputs, concatenated

    def inverse(self, device: torch.device) -> torch.Tensor | None:
        """The index that puts the concatenated outputs in row order; `None` where they are in order already."""
        if self.order == tuple(range(len(self.order))):
            return None
        inverse = [0] * len(self.order)
        for position, row in enumerate(self.order):
            inverse[row] = position
        return torch.tensor(inverse, device=device)


def as_index(rows: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """`rows` as an index of a tensor's first dimension: a slice (a view, no copy) where they are consecutive."""
    start = rows[0]
    if tuple(rows) == tuple(range(start, start + len(rows))):
        return slice(start, start + len(rows))
    return torch.tensor(rows, device=device)


def plan(rows: Rows, keys: Mapping[str, Hashable]) -> Plan:
    """Group `rows` by the weights (`keys`: adapter -> key) a unit needs for them. A row whose adapters need different
    weights becomes one row per key (the first key's rows come first, then the second's, ...), so that copies of a
    batch stay contiguous; rows whose adapters agree keep their place."""
    parts = []  # (part number, source row, adapters, key)
    for source, names in enumerate(rows):
        by_key: dict[Hashable, list[str]] = {}
        for name in names:
            by_key.setdefault(keys[name], []).append(name)
        parts.extend((number, source, tuple(part), key) for number, (key, part) in enumerate(by_key.items()))
    parts.sort(key=lambda part: part[:2])
    positions: dict[Hashable, list[int]] = {}
    for row, (_, _, _, key) in enumerate(parts):
        positions.setdefault(key, []).append(row)
    groups = tuple(
        Group(key, parts[rows_of_key[0]][2][0], tuple(parts[row][1] for row in rows_of_key))
        for key, rows_of_key in positions.items()
    )
    order = tuple(row for rows_of_key in positions.values() for row in rows_of_key)
    return Plan(groups, tuple(part[2] for part in parts), order)


def leaves(value: Any) -> list[Any]:
    """The tensors and plain values in `value`, a nesting of tuples, lists and dicts."""
    if isinstance(value, Mapping):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def first_rows(*values: Any) -> int | None:
    """The number of rows of the first tensor (with at least one dimension) in `values`, or `None`."""
    for leaf in leaves(values):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return leaf.shape[0]
    return None


def splittable(values: Sequence[Any], count: int) -> bool:
    """Whether `values` can be cut into groups of rows: every tensor in them has `count` rows first (and a second
    dimension: a vector could as well be a sequence), everything else is a plain value."""
    return all(
        (isinstance(leaf, torch.Tensor) and leaf.dim() > 1 and leaf.shape[0] == count) or isinstance(leaf, _PLAIN)
        for leaf in leaves(values)
    )


def take(value: Any, index: slice | torch.Tensor) -> Any:
    """`value` with the rows `index` of each of its tensors (a copy of the nesting; plain values as they are)."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, Mapping):
        return type(value)(**{name: take(item, index) for name, item in value.items()})
    if isinstance(value, (tuple, list)):
        items = [take(item, index) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
    return value


def join(outputs: Sequence[Any], sizes: Sequence[int], order: torch.Tensor | None) -> Any:
    """The groups' `outputs` (of `sizes` rows each) as one: each tensor concatenated along its rows (then put in row
    order by `order`); plain values must agree. Raises an `InputError` for anything else (a value not per row)."""
    first = outputs[0]
    if isinstance(first, torch.Tensor) and all(
        output.dim() > 0 and output.shape[0] == size for output, size in zip(outputs, sizes, strict=True)
    ):
        joined = torch.cat(list(outputs)) if len(outputs) > 1 else first
        return joined if order is None else joined.index_select(0, order)
    if isinstance(first, Mapping):
        return type(first)(**{name: join([output[name] for output in outputs], sizes, order) for name in first})
    if isinstance(first, (tuple, list)):
        items = [join([output[i] for output in outputs], sizes, order) for i in range(len(first))]
        return type(first)(*items) if hasattr(first, "_fields") else type(first)(items)
    if isinstance(first, _PLAIN) and all(output == first for output in outputs[1:]):
        return first
    shape = f" of shape {tuple(first.shape)}" if isinstance(first, torch.Tensor) else ""
    raise InputError(
        f"A tuned block returned a {type(first).__name__}{shape}, which is not one row per example, so its rows "
        "cannot be joined across adapters."
    )
