"""Delta (de)serialisation: base fingerprints, checked delta state dicts, and atomic adapter writes.

An adapter file maps `base_model.model.<tensor path>` to `tuned - base` for every parameter and persistent buffer of
the tuned modules (BatchNorm running statistics included). Loading checks the file against the model before anything
is changed: the keys, shapes and dtypes, and the fingerprint of the base weights the adapter was trained on.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

__all__ = ["save_adapter"]

KEY_PREFIX = "base_model.model."
_FINGERPRINT_DIGEST_CHARS = 16


def _hash_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())


def fingerprint(model_name: str, block_tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-block sha256 (shortened) of the base tensors, with the floating dtypes they are stored in:
    `{"model": class name, "dtypes": [...], "blocks": {block: hex}}`."""
    blocks = {}
    dtypes = set()
    for block, tensors in block_tensors.items():
        digest = hashlib.sha256()
        for name in sorted(tensors):
            _hash_tensor(digest, name, tensors[name])
            if tensors[name].is_floating_point():
                dtypes.add(str(tensors[name].dtype).removeprefix("torch."))
        blocks[block] = digest.hexdigest()[:_FINGERPRINT_DIGEST_CHARS]
    return {"model": model_name, "dtypes": sorted(dtypes), "blocks": blocks}


def check_fingerprint(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Raise a `ValueError` naming what differs between the base an adapter was trained on and this one."""
    override = (
        "To load it anyway, pass `verify_base=False`: `PeftModel.from_pretrained(model, path, verify_base=False)`, "
        "or set it on a `SurgicalConfig.from_pretrained(path)` passed as `config=`."
    )
    if recorded.get("model") != current["model"]:
        raise ValueError(
            f"This adapter was trained on a {recorded.get('model')}, not a {current['model']}. {override}"
        )
    recorded_blocks, current_blocks = recorded.get("blocks", {}), current["blocks"]
    if set(recorded_blocks) != set(current_blocks):
        raise ValueError(
            f"This adapter was trained on a base with blocks {list(recorded_blocks)}, but this model's blocks are "
            f"{list(current_blocks)}. {override}"
        )
    differing = [block for block in current_blocks if recorded_blocks[block] != current_blocks[block]]
    if differing and "dtypes" in recorded and recorded["dtypes"] != current["dtypes"]:
        raise ValueError(
            f"This adapter was trained on a base stored in {', '.join(recorded['dtypes'])}, but this model is in "
            f"{', '.join(current['dtypes'])}: load the base in the adapter's dtype (e.g. `torch_dtype=torch."
            f"{recorded['dtypes'][0]}`), apply the adapter, then cast. {override}"
        )
    if differing:
        raise ValueError(
            f"This adapter was trained on different base weights: block(s) {', '.join(differing)} differ from the "
            f"base it was created on (another checkpoint?). {override}"
        )


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
        raise ValueError("The adapter does not fit this model: " + "; ".join(problems[:5]) + ".")


def check_adapter_file(path: Path) -> None:
    """Raise a `ValueError` if `path` is not a complete safetensors file (only its header is read)."""
    try:
        with safe_open(str(path), framework="pt") as file:
            file.keys()
    except SafetensorError as error:
        raise ValueError(f"{path} is not a valid safetensors file (truncated or corrupt?): {error}") from error


@contextmanager
def _staging_directory(target: Path) -> Iterator[Path]:
    """A fresh directory beside `target` that replaces it on success and disappears on failure."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = None
    if target.exists():
        previous = target.with_name(f".{target.name}.{os.getpid()}.previous")
        os.replace(target, previous)
    os.replace(staging, target)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


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
    with _staging_directory(target) as staging:
        model.save_pretrained(str(staging), **kwargs)
        if write_extra is not None:
            write_extra(staging)
    return target
