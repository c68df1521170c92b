"""Fingerprints of base weights, per block: an adapter records the base it was trained on, and loading it onto another
checkpoint, architecture, shape, dtype or quantization is refused with an error that names what differs.

A quantized base is fingerprinted as it was loaded: its quantized storage (integer data and scales), and which kind it
is (`"quantized"`, e.g. `["bitsandbytes Int8Params"]`). An adapter tuned on it loads onto the same checkpoint quantized
the same way; onto the full-precision checkpoint it came from it is refused (its tuned blocks start from the
dequantized weights, so its deltas are relative to them), unless `verify_base=False`.

Example:
    >>> import torch
    >>> recorded = fingerprint("Net", {"stem": {"w": torch.zeros(2)}, "head": {"b": torch.ones(1)}})
    >>> sorted(recorded["blocks"]), recorded["dtypes"]
    (['head', 'stem'], ['float32'])
    >>> check_fingerprint(recorded, fingerprint("Net", {"stem": {"w": torch.ones(2)}, "head": {"b": torch.ones(1)}}))
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: This adapter was trained on different base weights: block(s) stem differ ...
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InputError
from .quantized import quantization_of

__all__ = ["check_fingerprint", "check_fingerprint_format", "fingerprint", "hash_tensor"]

_FINGERPRINT_DIGEST_CHARS = 16


def hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed `name`, the dtype, the shape and the bytes of `tensor` to the hashlib object `digest` (of each tensor it
    is made of, for a tensor subclass that holds others, such as torchao's quantized tensors)."""
    if quantization_of(tensor) and hasattr(tensor, "__tensor_flatten__"):
        for inner in tensor.__tensor_flatten__()[0]:
            hash_tensor(digest, f"{name}.{inner}", getattr(tensor, inner))
        return
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def fingerprint(model_name: str, block_tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-block sha256 (shortened) of the base tensors, with the floating dtypes they are stored in and, for a
    quantized base, its kinds of quantized storage: `{"model": class name, "dtypes": [...], "blocks": {block: hex}}`,
    plus `"quantized": [...]` where there are any."""
    blocks = {}
    dtypes, quantized = set(), set()
    for block, tensors in block_tensors.items():
        digest = hashlib.sha256()
        for name in sorted(tensors):
            hash_tensor(digest, name, tensors[name])
            if tensors[name].is_floating_point():
                dtypes.add(str(tensors[name].dtype).removeprefix("torch."))
            quantized.add(quantization_of(tensors[name]))
        blocks[block] = digest.hexdigest()[:_FINGERPRINT_DIGEST_CHARS]
    quantized.discard(None)
    return {"model": model_name, "dtypes": sorted(dtypes), "blocks": blocks} | (
        {"quantized": sorted(quantized)} if quantized else {}
    )


def check_fingerprint_format(value: Any) -> None:
    """Raise an `InputError` unless `value` has the shape `fingerprint` returns (e.g. after a config file was edited).

    Example:
        >>> check_fingerprint_format("garbage")
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: base_fingerprint must be ... got 'garbage'.
    """
    expected = (
        '{"model": <class name>, "dtypes": [<dtype>, ...], "blocks": {<block>: <hex digest>, ...}} (and '
        '"quantized": [<storage>, ...] for a quantized base)'
    )
    blocks = value.get("blocks") if isinstance(value, dict) else None
    lists = [value.get(key, []) for key in ("dtypes", "quantized")] if isinstance(value, dict) else [None]
    if not (
        isinstance(value, dict)
        and isinstance(value.get("model"), str)
        and isinstance(blocks, dict)
        and all(isinstance(name, str) and isinstance(digest, str) for name, digest in blocks.items())
        and all(isinstance(items, list) and all(isinstance(item, str) for item in items) for items in lists)
    ):
        raise InputError(f"base_fingerprint must be {expected}, got {value!r:.200}.")


def check_fingerprint(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise an `InputError` naming what differs between the base an adapter was trained on and this one."""
    override = (
        "To load it anyway, pass `verify_base=False`: `PeftModel.from_pretrained(model, path, verify_base=False)`, "
        "or set it on a `SurgicalConfig.from_pretrained(path)` passed as `config=`."
    )
    if recorded.get("model") != current["model"]:
        raise InputError(
            f"This adapter was trained on a {recorded.get('model')}, not a {current['model']}. {override}"
        )
    recorded_blocks, current_blocks = recorded.get("blocks", {}), current["blocks"]
    if set(recorded_blocks) != set(current_blocks):
        raise InputError(
            f"This adapter was trained on a base with blocks {list(recorded_blocks)}, but this model's blocks are "
            f"{list(current_blocks)}. {override}"
        )
    _check_quantization(recorded.get("quantized", []), current.get("quantized", []), override)
    differing = [block for block in current_blocks if recorded_blocks[block] != current_blocks[block]]
    if differing and "dtypes" in recorded and recorded["dtypes"] != current["dtypes"]:
        raise InputError(
            f"This adapter was trained on a base stored in {', '.join(recorded['dtypes'])}, but this model is in "
            f"{', '.join(current['dtypes'])}: load the base in the adapter's dtype (e.g. `torch_dtype=torch."
            f"{recorded['dtypes'][0]}`), apply the adapter, then cast. {override}"
        )
    if differing:
        raise InputError(
            f"This adapter was trained on different base weights: block(s) {', '.join(differing)} differ from the "
            f"base it was created on (another checkpoint?). {override}"
        )


def _check_quantization(recorded: list[str], current: list[str], override: str) -> None:
    """An `InputError` naming both when the base an adapter was tuned on and this one are not quantized alike."""
    if recorded == current:
        return
    if recorded:
        raise InputError(
            f"This adapter was tuned on a quantized base ({', '.join(recorded)}; its tuned blocks started from their "
            f"dequantized weights), but this model is {_described(current)}. Load the base quantized the same way "
            "(the quantization_config it was tuned with), or load it anyway: its deltas then apply to this model's "
            f"weights, which differ from the dequantized ones by the quantization error. {override}"
        )
    raise InputError(
        f"This adapter was tuned on a full-precision base, but this model is {_described(current)}. Load the base "
        f"without quantization, or load it anyway: its tuned blocks then start from the dequantized weights, which "
        f"differ from the full-precision ones by the quantization error. {override}"
    )


def _described(quantized: list[str]) -> str:
    return f"quantized with {', '.join(quantized)}" if quantized else "not quantized"
