"""Adapter files: checked delta state dicts, and adapter writes that never lose or half-write anything.

An adapter file maps `base_model.model.<tensor path>` to `tuned - base` for every parameter and persistent buffer of
the tuned modules (BatchNorm running statistics included). Loading checks the file against the model before anything
is changed: the keys, shapes and dtypes, that every value is finite (and, in `fingerprint`, the base weights the
adapter was trained on).

`save_adapter` also seals the weights file: its safetensors metadata records a sha256 of its tensors (a flipped bit is
refused at load) and the config fields that give the tensors their meaning (see `RECORDED_FIELDS`), so that the
weights file alone tells what it is, whatever `adapter_config.json` says. Files written by PEFT's own
`save_pretrained` have neither and still load.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from ..errors import InputError
from ..files import kill_point, move_into_place, staging_inside
from .fingerprint import hash_tensor

__all__ = ["save_adapter"]

KEY_PREFIX = "base_model.model."
CHECKSUM_KEY = "surgical_tensors_sha256"
RECORD_KEY = "surgical_config"
RECORDED_FIELDS = (
    "block",
    "target_modules",
    "exclude_modules",
    "modules_to_save",
    "delta_dtype",
    "base_fingerprint",
    "bias",
)
"""The config fields a sealed weights file records: which modules its tensors belong to, their dtype, the base."""


def check_delta_state_dict(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], delta_dtype: torch.dtype | None
) -> None:
    """Check an adapter's deltas against the (base) tensors they apply to: same keys, shapes and a compatible dtype."""
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
        if target.dtype in (torch.float16, torch.bfloat16):  # saved while PEFT's autocast had it in float32
            allowed.add(torch.float32)
        if delta.dtype not in allowed:
            problems.append(f"{key} has dtype {delta.dtype}, expected {' or '.join(sorted(str(d) for d in allowed))}")
    if problems:
        raise InputError("The adapter does not fit this model: " + "; ".join(problems[:5]) + ".")


def check_finite(tensors: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise an `InputError` naming the tensors of `tensors` that hold NaN or inf.

    Example:
        >>> check_finite({"a.weight": torch.ones(2), "a.bias": torch.tensor([1.0, float("nan")])}, "the adapter")
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: the adapter holds NaN or inf in 1 tensor(s): a.bias.
    """
    broken = [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    ]
    if broken:
        raise InputError(f"{where} holds NaN or inf in {len(broken)} tensor(s): {', '.join(sorted(broken)[:5])}.")


def tensors_checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of `tensors`, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        hash_tensor(digest, name, tensors[name])
    return digest.hexdigest()


class AdapterFile(NamedTuple):
    """What a checked weights file holds: its tensor names and, if sealed by `save_adapter`, its recorded fields."""

    keys: list[str]
    record: dict[str, Any] | None


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file: safetensors, or PEFT's `adapter_model.bin` (`save_pretrained(...,
    safe_serialization=False)`), read as PEFT reads it, with PyTorch's tensors-only unpickler (`weights_only=True`)."""
    if path.suffix == ".bin":
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # the restricted unpickler raises many types on a bad or hostile file
            raise InputError(
                f"{path} is not a valid tensors-only PyTorch file (corrupt, or not weights?): {error}"
            ) from error
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise InputError(f"{path} does not hold a mapping of names to tensors.")
        return tensors, {}
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error


def read_adapter_file(path: Path) -> AdapterFile:
    """Read and check the weights file `path`: complete, every value finite and, if sealed, the tensors' checksum
    and record intact. Raises an `InputError` naming the file and what is wrong."""
    tensors, metadata = _read(path)
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_checksum(tensors):
        raise InputError(
            f"{path} is corrupt: its tensors do not match the sha256 recorded when it was saved (a damaged copy?)."
        )
    check_finite(tensors, str(path))
    record = None
    if RECORD_KEY in metadata:
        try:
            record = json.loads(metadata[RECORD_KEY])
        except json.JSONDecodeError as error:
            raise InputError(f"{path}: the metadata field {RECORD_KEY!r} is not valid JSON: {error}") from error
        if not isinstance(record, dict):
            raise InputError(f"{path}: the metadata field {RECORD_KEY!r} must be a JSON object, got {record!r:.100}.")
    return AdapterFile(keys=sorted(tensors), record=record)


def _with_sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its metadata in key order (safetensors writes a hash map: a random order, so
    two saves of one adapter would differ)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _seal(weights: Path) -> None:
    """Rewrite the staged weights file `weights` with its checksum and its config's `RECORDED_FIELDS`."""
    config = json.loads((weights.parent / CONFIG_NAME).read_text())
    tensors, metadata = _read(weights)
    metadata[CHECKSUM_KEY] = tensors_checksum(tensors)
    metadata[RECORD_KEY] = json.dumps({name: config.get(name) for name in RECORDED_FIELDS})
    weights.write_bytes(_with_sorted_metadata(save(tensors, metadata=metadata)))


def _write_order(staging: Path) -> list[tuple[Path, str]]:
    """The staged files and their names, weights first, then configs, then the rest (the model card)."""
    files = sorted(path for path in staging.rglob("*") if path.is_file())
    rank = {SAFETENSORS_WEIGHTS_NAME: 0, CONFIG_NAME: 1}
    files.sort(key=lambda path: rank.get(path.name, 2))
    return [(path, path.relative_to(staging).as_posix()) for path in files]


def save_adapter(
    model: Any, save_directory: str | os.PathLike, *, write_extra: Callable[[Path], None] | None = None, **kwargs: Any
) -> Path:
    """`model.save_pretrained(save_directory, **kwargs)`, so that no failure or kill loses or half-writes anything.

    PEFT writes the model card, the weights and the config one after the other into `save_directory`. This writes
    them into a private staging directory inside `save_directory`, seals the weights (a checksum, and a record of the
    config fields that give them their meaning), then renames each file over its final name: the weights, then
    `adapter_config.json`, then the model card, each fsynced before its rename and the directory after it. Nothing
    else in `save_directory` is touched.

    Why this order: into an empty directory, the config comes last, so an adapter appears only once it is complete.
    Over an existing adapter, a kill between two renames leaves the new weights beside the old config; the weights
    file's own record then describes them, and `SurgicalConfig.from_pretrained` uses it (with a warning), so the
    directory always loads as the old adapter or as the new one. A killed save leaves only its staging directory,
    which the next `save_adapter` into that directory removes.

    Args:
        model: a `PeftModel`.
        save_directory: a directory (created if needed); an adapter there is replaced, other files are kept.
        write_extra: called with the staging directory after the adapter is written there, to add files such as a
            model card; they are moved into place with the others.
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
    if not isinstance(model, PeftModel):
        raise InputError(
            f"save_adapter saves a PEFT adapter, and {type(model).__name__} is not a PeftModel: make one with "
            "peft.get_peft_model(model, SurgicalConfig(...)), or save a whole model with its own save_pretrained."
        )
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise InputError(f"Cannot save an adapter to {target}: it exists and is not a directory.")
    if not kwargs.get("safe_serialization", True):
        raise InputError("save_adapter writes safetensors only: safe_serialization=False (a pickle) is not supported.")
    with staging_inside(target) as staging:
        model.save_pretrained(str(staging), **kwargs)
        for weights in staging.rglob(SAFETENSORS_WEIGHTS_NAME):
            _seal(weights)
        if write_extra is not None:
            write_extra(staging)
        kill_point("staged")
        move_into_place(target, _write_order(staging))
    return target
