"""A surgical adapter as a LoRA adapter: `convert_to_lora` and `save_as_lora`, with PEFT's signatures.

LoRA is what the rest of the ecosystem loads (Diffusers, vLLM and other serving stacks, hotswapping, mixed-adapter
batches). A surgical adapter changes whole tensors of a block; each module's change goes where LoRA can hold it:

- the weight of a `Linear`, a transformers `Conv1D`, a `Conv1d`/`Conv2d`/`Conv3d` (LoRA's conv layers: no groups,
  dilation or other padding mode) and an `Embedding` becomes LoRA factors `B @ A` from a truncated SVD of its delta
  (`lora_alpha = r`, so the scaling is 1); its bias, where it changed, goes through `lora_bias` (LoRA's `lora_B` bias);
- what LoRA cannot express goes to `modules_to_save` in full (the tuned values): norm weights and biases, BatchNorm
  running statistics, a container's own tensors (the container, e.g. transformers' `ViTEmbeddings` for `cls_token`),
  modules LoRA's layers cannot reproduce (grouped or dilated convs, a `MultiheadAttention`'s weights), an `Embedding`
  beside a `lora_bias` (LoRA has none for embeddings), and the surgical adapter's own `modules_to_save`.

`rank` is PEFT's: an int (a module whose delta has a lower rank gets its full rank, in `rank_pattern`), or a float in
(0, 1], the share of each delta's squared singular values to keep. At full rank (`rank=1.0`) the LoRA adapter
computes what the surgical adapter does, up to float rounding. Importing surgical_peft routes PEFT's own
`peft.convert_to_lora` and `peft.save_as_lora` here for surgical models (`tuner._internals.route_lora_conversion`).

Example:
    >>> import tempfile, torch
    >>> from peft import PeftModel, get_peft_model
    >>> from surgical_peft import SurgicalConfig, save_as_lora
    >>> def base():
    ...     torch.manual_seed(0)
    ...     return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    >>> model = get_peft_model(base(), SurgicalConfig(target_modules=["0", "1"], init_weights=False))
    >>> path = save_as_lora(tempfile.mkdtemp(), model, rank=1.0)
    >>> lora = PeftModel.from_pretrained(base(), path)
    >>> lora.peft_config["default"].modules_to_save, lora.peft_config["default"].lora_bias
    (['1'], True)
    >>> x = torch.randn(3, 4)
    >>> bool(torch.allclose(lora(x), model(x), atol=1e-6))
    True
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, ModulesToSaveWrapper
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..blocks.paths import is_under, join
from ..errors import InputError
from ..files import move_into_place, staging_inside
from ._internals import DUMMY_TARGET_MODULES, energy_rank
from .model import SurgicalModel

__all__ = ["convert_to_lora", "converts_to_lora", "save_as_lora"]

_PREFIX = "base_model.model."
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def converts_to_lora(model: nn.Module) -> bool:
    """Whether `model` is a `PeftModel` with surgical adapters, which `convert_to_lora` converts.

    Example:
        >>> converts_to_lora(torch.nn.Linear(2, 2))
        False
    """
    return isinstance(getattr(model, "base_model", None), SurgicalModel)


def _lora_kind(model: nn.Module, path: str, names: set[str]) -> str | None:
    """How LoRA holds a change of the tensors `names` of the module at `path`: `"linear"`, `"conv1d"` (transformers'
    `Conv1D`), `"conv"` or `"embedding"`; `None` where LoRA's layer for the module cannot reproduce it."""
    module = model.get_submodule(path)
    parent = model.get_submodule(path.rpartition(".")[0]) if path else None
    if not names <= {"weight", "bias"} or isinstance(parent, nn.MultiheadAttention):  # (it reads out_proj's weight)
        return None
    if isinstance(module, Conv1D):
        return "conv1d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Embedding):
        return "embedding"
    plain = isinstance(module, _CONVS) and module.groups == 1 and module.padding_mode == "zeros"
    return "conv" if plain and all(step == 1 for step in module.dilation) else None


def _tensor_changes(tuner: SurgicalModel, adapter_name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Tensor path -> (base, delta) of every tensor `adapter_name` tunes."""
    changes = {}
    for path in tuner._adapter_modules[adapter_name]:
        layer = tuner._layer(path)
        delta = layer.delta(adapter_name)
        changes.update({layer.tensor_paths[name]: (base, delta[name]) for name, base in layer.base.items()})
    return changes


def _by_module(changes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {tensor name: delta}."""
    modules: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    for tensor_path, (_, delta) in changes.items():
        module_path, _, name = tensor_path.rpartition(".")
        modules[module_path][name] = delta
    return dict(modules)


def _outermost(paths: set[str]) -> list[str]:
    return sorted(path for path in paths if not is_under(path, [other for other in paths if other != path]))


def _factor(matrix: torch.Tensor, rank: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`(A, B)` with `B @ A` the best approximation of `matrix` of rank `rank` (an int, at most the matrix's) or of
    the share `rank` (a float) of its squared singular values; rank 1 for a zero matrix."""
    left, singular, right = torch.linalg.svd(matrix.float(), full_matrices=False)
    if not bool(singular.any()):
        kept = 1
    else:
        kept = energy_rank(singular, rank) if isinstance(rank, float) else min(rank, singular.numel())
    return right[:kept], left[:, :kept] * singular[:kept]


def _lora_tensors(
    kind: str, path: str, module: nn.Module, deltas: dict[str, torch.Tensor], rank: float, lora_bias: bool, factor: Any
) -> tuple[dict[str, torch.Tensor], int]:
    """The LoRA state-dict entries (PEFT's saved keys) of one module's change, and their rank."""
    weight = deltas.get("weight", torch.zeros_like(module.weight, device="cpu"))
    key = _PREFIX + path
    if kind == "embedding":  # LoRA's embedding delta is (B @ A).T
        a, b = factor(weight.T, rank)
        tensors = {f"{key}.lora_embedding_A": a, f"{key}.lora_embedding_B": b}
    else:
        matrix = weight.T if kind == "conv1d" else weight.reshape(weight.shape[0], -1)
        a, b = factor(matrix, rank)
        if kind == "conv":  # A: a conv like the module's, to `rank` channels; B: a 1x1 conv back to its outputs
            a = a.reshape(a.shape[0], *weight.shape[1:])
            b = b.reshape(*b.shape, *(1,) * (weight.dim() - 2))
        tensors = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
        if lora_bias:
            tensors[f"{key}.lora_B.bias"] = deltas.get("bias", torch.zeros(b.shape[0]))
    return {name: tensor.to(weight.dtype).contiguous() for name, tensor in tensors.items()}, a.shape[0]


def _saved_values(
    tuner: SurgicalModel, adapter_name: str, path: str, changes: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """The full tensors of the module at `path` with `adapter_name`'s `changes`, keyed as LoRA saves
    `modules_to_save`: PEFT's own copy for a module the adapter saves in full, else base + delta for the tensors it
    tunes and the base for the others."""
    module = tuner.model.get_submodule(path)
    if isinstance(module, ModulesToSaveWrapper):
        state = module.modules_to_save[adapter_name].state_dict()
        return {_PREFIX + join(path, name): tensor.detach().cpu().clone() for name, tensor in state.items()}
    if any(isinstance(inner, ModulesToSaveWrapper) for inner in module.modules()):
        raise InputError(f"LoRA cannot save {path!r} in full: it holds modules_to_save of its own.")
    values = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        tensor_path = join(path, name)
        base, delta = changes.get(tensor_path, (tuner._base_tensor(tensor_path, tensor), None))
        values[_PREFIX + tensor_path] = (base if delta is None else base + delta).detach().cpu().clone()
    return values


def _check_rank(rank: Any) -> None:
    if isinstance(rank, float) and 0 < rank <= 1:
        return
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1:
        return
    raise InputError(
        f"rank must be an int of at least 1 (the LoRA rank) or a float in (0, 1] (the share of each delta's squared "
        f"singular values to keep, 1.0: full rank), got {rank!r}."
    )


def _plan(tuner: SurgicalModel, changes: dict[str, dict[str, torch.Tensor]]) -> tuple[dict[str, str], list[str], bool]:
    """`({module path: LoRA kind}, modules_to_save paths, lora_bias)` for the modules' `changes`."""
    kinds = {path: _lora_kind(tuner.model, path, set(deltas)) for path, deltas in changes.items()}
    lora_bias = any(
        kind is not None and bool(changes[path].get("bias", torch.zeros(1)).any()) for path, kind in kinds.items()
    )
    if lora_bias:  # LoRA has no bias for embeddings
        kinds = {path: None if kind == "embedding" else kind for path, kind in kinds.items()}
    if kinds.get("", "no change") is None:
        raise InputError(
            f"LoRA cannot express a change of the model's own tensors {sorted(changes[''])}: modules_to_save would "
            "copy the whole model. Export an adapter that leaves them untouched."
        )
    wrappers = {path for path, module in tuner.model.named_modules() if isinstance(module, ModulesToSaveWrapper)}
    to_save = _outermost({path for path, kind in kinds.items() if kind is None} | wrappers)
    factored = {path: kind for path, kind in kinds.items() if kind is not None and not is_under(path, to_save)}
    return factored, to_save, lora_bias


def convert_to_lora(
    model: nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The surgical adapter `adapter_name` of `model` as a LoRA adapter: its `LoraConfig` and its state dict, keyed
    as `PeftModel.save_pretrained` saves LoRA (PEFT's `peft.convert_to_lora`, which calls this for surgical models).

    Args:
        model: a `PeftModel` with a surgical adapter.
        rank: an int, the LoRA rank (a module's delta of lower rank keeps its full rank), or a float in (0, 1]: per
            module, the smallest rank holding that share of the delta's squared singular values (1.0: full rank,
            which reproduces the surgical adapter).
        adapter_name: the surgical adapter to convert.
        progressbar: show a progress bar over the modules.
        compile_kwargs: if given, each module's factorisation is compiled with `torch.compile(**compile_kwargs)`.

    Raises:
        InputError: for an unknown adapter, a rank out of range, or a change LoRA cannot hold (the model's own
            tensors, which `modules_to_save` cannot copy without the whole model).

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> base = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
        >>> model = get_peft_model(base, SurgicalConfig(target_modules=["0", "1"], init_weights=False))
        >>> config, state_dict = convert_to_lora(model, rank=2)
        >>> config.r, config.modules_to_save, sorted(state_dict)[:2]
        (2, ['1'], ['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.bias'])
    """
    if not converts_to_lora(model):
        raise InputError(
            f"convert_to_lora converts surgical adapters, and this {type(model).__name__} has none; other PEFT "
            "methods convert with peft.convert_to_lora."
        )
    tuner: SurgicalModel = model.base_model
    if adapter_name not in tuner.peft_config:
        raise InputError(f"No adapter {adapter_name!r} to convert. Adapters: {list(tuner.peft_config)}.")
    _check_rank(rank)
    factor: Callable = torch.compile(_factor, **compile_kwargs) if compile_kwargs is not None else _factor
    config = tuner.peft_config[adapter_name]
    changes = _tensor_changes(tuner, adapter_name)
    modules = _by_module(changes)
    factored, to_save, lora_bias = _plan(tuner, modules)
    state_dict: dict[str, torch.Tensor] = {}
    ranks = {}
    for path, kind in tqdm(factored.items(), desc="Converting to LoRA", disable=not progressbar):
        module = tuner.model.get_submodule(path)
        tensors, ranks[path] = _lora_tensors(kind, path, module, modules[path], rank, lora_bias, factor)
        state_dict.update(tensors)
    for path in to_save:
        state_dict.update(_saved_values(tuner, adapter_name, path, changes))
    r = rank if isinstance(rank, int) else 1
    patterns = {f"^{re.escape(path)}": kept for path, kept in ranks.items() if kept != r}  # exactly that module
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,
        target_modules="|".join(map(re.escape, factored)) or DUMMY_TARGET_MODULES,  # exactly these
        rank_pattern=patterns,
        alpha_pattern=dict(patterns),
        lora_bias=lora_bias,
        modules_to_save=to_save or None,
        fan_in_fan_out=bool(factored) and set(factored.values()) == {"conv1d"},
        base_model_name_or_path=config.base_model_name_or_path,
        task_type=config.task_type,
    )
    return lora_config, state_dict


def save_as_lora(
    path: str | os.PathLike,
    model: nn.Module,
    rank: float,
    adapter_name: str = "default",
    progressbar: bool = False,
    compile_kwargs: dict | None = None,
) -> Path:
    """Convert the surgical adapter `adapter_name` to LoRA (`convert_to_lora`) and save it in `path` as PEFT saves a
    LoRA adapter (`adapter_model.safetensors`, `adapter_config.json`), so that `PeftModel.from_pretrained(base,
    path)` loads it. The files are written beside their final names and renamed into place, weights first, so that a
    failure leaves the directory as it was. Returns `path`.

    Example:
        >>> import tempfile, torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> sorted(p.name for p in save_as_lora(tempfile.mkdtemp(), model, rank=2).iterdir())
        ['adapter_config.json', 'adapter_model.safetensors']
    """
    lora_config, state_dict = convert_to_lora(model, rank, adapter_name, progressbar, compile_kwargs)
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise InputError(f"Cannot save a LoRA adapter to {target}: it exists and is not a directory.")
    with staging_inside(target) as staging:
        save_file(state_dict, staging / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})
        lora_config.save_pretrained(str(staging))
        move_into_place(target, [(staging / name, name) for name in (SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME)])
    return target
