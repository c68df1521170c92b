"""Adapter files: checked delta state dicts, and adapter writes that never lose or half-write anything.

An adapter file maps `base_model.model.<tensor path>` to `tuned - base` for every parameter and persistent buffer of
the tuned modules (BatchNorm running statistics included). Loading checks the file against the model before anything
is changed: first what its header announces (the name, shape and dtype of every tensor, read without reading any
tensor, so that a file announcing an 8 GB tensor is refused before it takes memory), then its data (the checksum, and
that every value is finite), and (in `fingerprint`) the base weights the adapter was trained on.

`save_adapter` also seals the weights file: its safetensors metadata records a sha256 of its tensors (a flipped bit is
refused at load), the config fields that give the tensors their meaning (see `RECORDED_FIELDS`), so that the
weights file alone tells what it is, whatever `adapter_config.json` says, and the base model's label names (a head in
`modules_to_save` that does not fit another base is refused naming them). Files written by PEFT's own
`save_pretrained` have neither and still load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from peft import PeftModel
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES  # safetensors' dtype names ("F32") -> torch dtypes
from safetensors.torch import save

from ..blocks.paths import is_under
from ..errors import InputError, few
from ..files import kill_point, move_into_place, reporting_full_disk, staging_inside
from .fingerprint import hash_tensor

__all__ = ["save_adapter"]

KEY_PREFIX = "base_model.model."
CHECKSUM_KEY = "surgical_tensors_sha256"
RECORD_KEY = "surgical_config"
LABELS_KEY = "surgical_labels"  # the base model's label names (config.id2label), as a JSON list
_MAX_HEADER_BYTES = 10_000_000  # of a safetensors header read before its tensors are checked (~70,000 tensors)
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
    problems += _misfits(state_dict, expected, delta_dtype)
    if problems:
        raise InputError("The adapter does not fit this model: " + "; ".join(problems[:5]) + ".")


def _misfits(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], delta_dtype: torch.dtype | None
) -> list[str]:
    """What is wrong with the shape or dtype of each tensor of `tensors` that `expected` also holds."""
    problems = []
    for key in sorted(set(tensors) & set(expected)):
        delta, target = tensors[key], expected[key]
        if delta.shape != target.shape:
            problems.append(f"{key} has shape {tuple(delta.shape)}, the model's is {tuple(target.shape)}")
        allowed = {target.dtype} | ({delta_dtype} if delta_dtype is not None and target.is_floating_point() else set())
        if target.dtype in (torch.float16, torch.bfloat16):  # saved while PEFT's autocast had it in float32
            allowed.add(torch.float32)
        if delta.dtype not in allowed:
            problems.append(f"{key} has dtype {delta.dtype}, expected {' or '.join(sorted(str(d) for d in allowed))}")
    return problems


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
    """What the header of a weights file announces (no tensor read): its tensor names, each tensor's shape and dtype
    (as a tensor on the meta device, which holds no data) and, if sealed by `save_adapter`, its recorded fields and the
    label names of the base it was saved from."""

    keys: list[str]
    record: dict[str, Any] | None
    announced: dict[str, torch.Tensor]
    labels: list[str] | None


def weights_file(directory: Path) -> Path | None:
    """The adapter's weights file in `directory`: `adapter_model.safetensors`, else PEFT's `adapter_model.bin` (PEFT
    loads the same one), or `None`."""
    candidates = (directory / name for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME))
    return next((path for path in candidates if path.is_file()), None)


def _load_pickle(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """PEFT's `adapter_model.bin` (`save_pretrained(..., safe_serialization=False)`), read as PEFT reads it, with
    PyTorch's tensors-only unpickler (`weights_only=True`); `map_location="meta"` reads no tensor."""
    try:
        tensors = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # the restricted unpickler raises many types on a bad or hostile file
        raise InputError(
            f"{path} is not a valid tensors-only PyTorch file (corrupt, or not weights?): {error}"
        ) from error
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InputError(f"{path} does not hold a mapping of names to tensors.")
    return tensors


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a weights file: safetensors, or PEFT's `adapter_model.bin`."""
    if path.suffix == ".bin":
        return _load_pickle(path), {}
    try:
        with safe_open(str(path), framework="pt") as file:
            return {key: file.get_tensor(key) for key in file.keys()}, file.metadata() or {}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise InputError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error


def _read_header(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The shape and dtype of every tensor of a weights file (as meta tensors) and its metadata, without reading (or
    mapping into memory) any tensor: a safetensors file's first 8 bytes and JSON header, checked as safetensors checks
    them, against the file's size; a `.bin`'s pickle, its tensors put on the meta device unread."""
    if path.suffix == ".bin":
        tensors = _load_pickle(path, map_location="meta")
        return {key: torch.empty(t.shape, dtype=t.dtype, device="meta") for key, t in tensors.items()}, {}
    try:
        with path.open("rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
            if not 0 <= length <= min(size - 8, _MAX_HEADER_BYTES):
                raise InputError(
                    f"{path} is not a valid safetensors file (truncated or corrupt?): its first 8 bytes announce a "
                    f"header of {length:,} bytes in a file of {size:,} (at most {_MAX_HEADER_BYTES:,} are read)."
                )
            header = json.loads(file.read(length), object_pairs_hook=_without_repeats)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error
    if not isinstance(header, dict):
        raise InputError(f"{path} is not a valid safetensors file: its header is no JSON object.")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path} is not a valid safetensors file: its __metadata__ must map names to strings.")
    return _announced(path, header, size - 8 - length), metadata


def _without_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict, refusing a name given twice (which another parser could read otherwise)."""
    counts = Counter(name for name, _ in pairs)
    repeated = [name for name, count in counts.items() if count > 1]
    if repeated:
        raise json.JSONDecodeError(f"a name given twice in one object: {few(repeated)}", "", 0)
    return dict(pairs)


def _announced(path: Path, header: Mapping[str, Any], data_bytes: int) -> dict[str, torch.Tensor]:
    """The tensors a safetensors header announces, as meta tensors, once checked as safetensors checks them: known
    dtypes, shapes of non-negative integers, and data offsets that cover the `data_bytes` after the header exactly,
    in order, each tensor's bytes those of its shape and dtype."""
    announced, end = {}, 0
    for key, entry in sorted(header.items(), key=lambda item: _start(item[1])):
        valid = isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
        shape, offsets = (entry.get("shape"), entry.get("data_offsets")) if valid else (None, None)
        valid = valid and isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)
        valid = valid and isinstance(offsets, list) and len(offsets) == 2 and offsets[0] == end
        dtype = SAFETENSORS_DTYPES[entry["dtype"]] if valid else None
        if not (valid and offsets[1] == end + math.prod(shape) * dtype.itemsize):
            raise InputError(
                f"{path} is not a valid safetensors file: the header's entry for {few([key])} is not a known dtype, "
                f"a shape and the data offsets [{end}, end of its bytes]: {few([entry])}."
            )
        announced[key] = torch.empty(shape, dtype=dtype, device="meta")
        end = offsets[1]
    if end != data_bytes:
        raise InputError(
            f"{path} is not a valid safetensors file (truncated or corrupt?): its header announces {end:,} bytes of "
            f"tensors, and {data_bytes:,} follow it."
        )
    return announced


def _start(entry: Any) -> int:
    """Where a header entry says its tensor's data starts (-1 where it does not say it well: refused by the check)."""
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    return offsets[0] if isinstance(offsets, list) and offsets and type(offsets[0]) is int else -1


def _json_field(path: Path, metadata: Mapping[str, str], key: str, kind: type) -> Any:
    """The metadata field `key` of the weights file `path`, parsed as JSON of type `kind` (`None` if absent)."""
    if key not in metadata:
        return None
    try:
        value = json.loads(metadata[key])
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: the metadata field {key!r} is not valid JSON: {error}") from error
    if not isinstance(value, kind):
        raise InputError(f"{path}: the metadata field {key!r} must be a JSON {kind.__name__}, got {value!r:.100}.")
    return value


def read_adapter_file(path: Path) -> AdapterFile:
    """Read the header of the weights file `path`: what it announces, and, if sealed, its record. No tensor is read:
    a header can announce any size, so the tensors are read only once checked against a model (`check_announced`).
    Raises an `InputError` naming the file and what is wrong."""
    announced, metadata = _read_header(path)
    record = _json_field(path, metadata, RECORD_KEY, dict)
    labels = _json_field(path, metadata, LABELS_KEY, list)
    return AdapterFile(keys=sorted(announced), record=record, announced=announced, labels=labels)


def check_announced(
    path: Path,
    expected: Mapping[str, torch.Tensor],
    delta_dtype: torch.dtype | None,
    heads: list[str],
    labels: list[str] | None,
) -> None:
    """Check what the header of the weights file `path` announces against the model, before any tensor is read:
    every tensor must be one of `expected` (the model's tensors, keyed as in the file) with its shape and a compatible
    dtype, so that reading the file takes no more memory than those tensors do. Raises an `InputError` naming the file
    and, for each misfit, the tensor, its announced and the model's shape; where a tensor of `heads` (the adapter's
    `modules_to_save`, e.g. a classifier) has another shape, also the label names the adapter was saved with and the
    model's (`labels`), where known."""
    saved = read_adapter_file(path)
    unexpected = sorted(set(saved.announced) - set(expected))
    problems = [f"{len(unexpected)} tensor(s) this model does not have: {few(unexpected)}"] if unexpected else []
    problems += _misfits(saved.announced, expected, delta_dtype)
    if not problems:
        return
    resized_heads = [
        key
        for key, tensor in saved.announced.items()
        if is_under(key.removeprefix(KEY_PREFIX), heads) and key in expected and tensor.shape != expected[key].shape
    ]
    hint = _labels_hint(saved.labels, labels) if resized_heads else ""
    raise InputError(f"{path} does not fit this model (refused before reading it): {'; '.join(problems[:5])}.{hint}")


def _labels_hint(saved: list[str] | None, model: list[str] | None) -> str:
    """What a message says of a head that does not fit: the labels it was trained for, and the model's."""
    adapter = f"{len(saved)} labels ({few(saved)})" if saved else "other labels"
    own = f"; this model's config has {len(model)} ({few(model)})" if model else ""
    return (
        f" The adapter's head (modules_to_save) was trained for {adapter}{own}: load it onto a base made for the same "
        "labels (transformers: from_pretrained(..., num_labels=..., id2label=..., ignore_mismatched_sizes=True))."
    )


def check_weights_data(path: Path) -> None:
    """Read the weights file `path` (its header already checked against the model) and check its data: every value
    finite and, if sealed, the tensors' checksum intact. Raises an `InputError` naming the file and what is wrong."""
    tensors, metadata = _read(path)
    recorded = metadata.get(CHECKSUM_KEY)
    if recorded is not None and recorded != tensors_checksum(tensors):
        raise InputError(
            f"{path} is corrupt: its tensors do not match the sha256 recorded when it was saved (a damaged copy?)."
        )
    check_finite(tensors, str(path))


def _with_sorted_metadata(data: bytes) -> bytes:
    """A safetensors file's bytes with its metadata in key order (safetensors writes a hash map: a random order, so
    two saves of one adapter would differ)."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data stays 8-byte aligned, as safetensors pads it
    return struct.pack("<Q", len(text)) + text + data[8 + length :]


def _seal(weights: Path, labels: list[str] | None) -> None:
    """Rewrite the staged weights file `weights` with its checksum, its config's `RECORDED_FIELDS` and the base
    model's `labels` (if it has any)."""
    config = json.loads((weights.parent / CONFIG_NAME).read_text())
    tensors, metadata = _read(weights)
    metadata[CHECKSUM_KEY] = tensors_checksum(tensors)
    metadata[RECORD_KEY] = json.dumps({name: config.get(name) for name in RECORDED_FIELDS})
    if labels:
        metadata[LABELS_KEY] = json.dumps(labels)
    weights.write_bytes(_with_sorted_metadata(save(tensors, metadata=metadata)))


def label_names(model: Any) -> list[str] | None:
    """The label names of a classifier (`config.id2label`, in label order), or `None` for a model without them.

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> label_names(ResNetForImageClassification(ResNetConfig(depths=[1], hidden_sizes=[8], num_labels=2)))
        ['LABEL_0', 'LABEL_1']
    """
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, Mapping) or not id2label:
        return None
    return [str(id2label[index]) for index in sorted(id2label, key=int)]


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
    them into a private staging directory inside `save_directory`, seals the weights (a checksum, a record of the
    config fields that give them their meaning, and the base model's label names), then renames each file over its
    final name: the weights, then `adapter_config.json`, then the model card, each fsynced before its rename and the
    directory after it. Nothing else in `save_directory` is touched. A disk that fills up meanwhile raises an `OSError`
    (ENOSPC) that says so, naming the directory and the space that was free, and leaves the directory as it was.

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
    unchanged = "Nothing was written: the directory is as it was (an adapter there unchanged)."
    with reporting_full_disk(target, "the adapter", then=unchanged), staging_inside(target) as staging:
        model.save_pretrained(str(staging), **kwargs)
        for weights in staging.rglob(SAFETENSORS_WEIGHTS_NAME):
            _seal(weights, label_names(model.get_base_model()))
        if write_extra is not None:
            write_extra(staging)
        kill_point("staged")
        move_into_place(target, _write_order(staging))
    return target
