"""Adapter files: checked delta state dicts, and atomic adapter writes.

An adapter file maps `base_model.model.<tensor path>` to `tuned - base` for every parameter and persistent buffer of
the tuned modules (BatchNorm running statistics included). Loading checks the file against the model before anything
is changed: the keys, shapes and dtypes (and, in `fingerprint`, the base weights the adapter was trained on).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import InputError
from ..files import staged_directory

__all__ = ["save_adapter"]

KEY_PREFIX = "base_model.model."


def check_delta_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], delta_dtype: torch.dtype | None
) -> None:
    """Check an adapter's deltas against the tensors they apply to: same keys, shapes and a compatible dtype."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensor(s) this model's tuned modules do not have, e.g. {unexpected[:3]}")
    for key in sorted(set(state_dict) & set(expected)):
        delta, target = state_dict[key], expected[key]
        if delta.shape != target.shape:
            problems.append(f"{key} has shape {tuple(delta.shape)}, the model's is {tuple(target.shape)}")
        allowed = {target.dtype} | ({delta_dtype} if delta_dtype is not None and target.is_floating_point() else set())
        if delta.dtype not in allowed:
            problems.append(f"{key} has dtype {delta.dtype}, expected {' or '.join(sorted(str(d) for d in allowed))}")
    if problems:
        raise InputError("The adapter does not fit this model: " + "; ".join(problems[:5]) + ".")


def check_adapter_file(path: Path) -> None:
    """Raise an `InputError` if `path` is not a complete safetensors file (only its header is read)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            file.keys()
    except SafetensorError as error:
        raise InputError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error


def save_adapter(
    model: Any, save_directory: str | os.PathLike, *, write_extra: Callable[[Path], None] | None = None, **kwargs: Any
) -> Path:
    """`model.save_pretrained(save_directory, **kwargs)`, atomically.

    PEFT writes the model card, the weights and the config one after the other; if anything fails half-way, the
    directory would hold a mix. This writes everything into a staging directory beside `save_directory` and moves it
    into place only when complete: a failure leaves the previous adapter (or nothing) behind, never a half-written one.

    Args:
        model: a `PeftModel`.
        save_directory: where the adapter goes; an existing adapter there is replaced.
        write_extra: called with the staging directory before it is moved into place, to add files such as a model
            card.
        kwargs: passed to `model.save_pretrained`.

    Example:
        >>> import tempfile, torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig, save_adapter
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> path = save_adapter(model, tempfile.mkdtemp() + "/adapter")
        >>> sorted(p.name for p in path.iterdir())
        ['README.md', 'adapter_config.json', 'adapter_model.safetensors']
    """
    target = Path(save_directory)
    with staged_directory(target) as staging:
        model.save_pretrained(str(staging), **kwargs)
        if write_extra is not None:
            write_extra(staging)
    return target
