"""Tensors as targets: what a container owns directly beside its submodules (a timm ViT's `cls_token` and
`pos_embed`, transformers' `ViTEmbeddings.cls_token`) belongs to another block than its children, so the tuner tunes
each such tensor by itself, under its tensor path, and PEFT's module matching (which sees only modules) is extended
to them here.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from surgical_peft import SurgicalConfig
    >>> class ViT(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cls_token = nn.Parameter(torch.zeros(1, 4))
    ...         self.blocks = nn.Linear(4, 4)
    >>> owns_loose_tensors(ViT()), owns_loose_tensors(nn.Linear(2, 2))
    (True, False)
    >>> tensor_targets(ViT(), SurgicalConfig(target_modules=["cls_token", "blocks"]))
    ['cls_token']
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import chain

from torch import nn

from ..blocks import is_under
from ..blocks.paths import join
from ._internals import BaseTuner
from .config import SurgicalConfig
from .layer import owned_tensors

__all__ = ["bias_targets", "owns_loose_tensors", "targets_saved_in_full", "tensor_targets"]


def owns_loose_tensors(module: nn.Module) -> bool:
    """Whether `module` is a container that owns tensors directly beside submodules with tensors of their own: each
    of its own tensors is then a target by itself (a tensor path such as `"cls_token"`), not with the module."""
    owns = next(owned_tensors(module), None) is not None
    return owns and any(
        next(chain(child.parameters(), child.buffers()), None) is not None for child in module.children()
    )


def bias_targets(model: nn.Module, modules_to_save: list[str] | None) -> list[str]:
    """Every bias of `model` (a parameter whose name contains "bias", as PEFT's `bias="all"` picks them) outside
    `modules_to_save`: the targets that `SurgicalConfig(bias="all")` adds."""
    paths = (path for path, _ in model.named_parameters())
    return [path for path in paths if "bias" in path.rpartition(".")[2] and not is_under(path, modules_to_save or [])]


def tensor_targets(model: nn.Module, config: SurgicalConfig) -> list[str]:
    """The tensors that `config` targets by themselves: those owned by containers (`owns_loose_tensors`), matched as
    PEFT matches module names (`target_modules`, `exclude_modules`), exactly where blocks name them (for a saved
    adapter's regex, never run, the tensors its weights file holds); and with `bias="all"`, every bias."""
    if config.saved_modules is not None and isinstance(config.target_modules, str):
        saved = set(config.saved_tensors or [])
        targeted: Callable[[str], object] = saved.__contains__
    else:
        exact = set(config.target_modules or []) if config.blocks else None

        def targeted(path: str) -> bool:
            matched = BaseTuner._check_target_module_exists(config, path)
            return bool(matched) and (exact is None or path in exact)

    containers = [(path, m) for path, m in model.named_modules() if owns_loose_tensors(m)]
    found = [join(path, name) for path, module in containers for name, _ in owned_tensors(module)]
    tensors = [path for path in found if targeted(path) and not is_under(path, config.modules_to_save or [])]
    biases = bias_targets(model, config.modules_to_save) if config.bias == "all" else []
    return list(dict.fromkeys([*tensors, *biases]))


def targets_saved_in_full(config: SurgicalConfig) -> bool:
    """Whether every module `config` targets is one it saves in full (`modules_to_save`), e.g. a new head tuned alone
    (`block="head"`): the adapter then holds no deltas, only the full copies.

    Example:
        >>> from surgical_peft import SurgicalConfig
        >>> targets_saved_in_full(SurgicalConfig(target_modules=["classifier"], modules_to_save=["classifier"]))
        True
    """
    targets, saved = config.target_modules, config.modules_to_save or []
    listed = isinstance(targets, (list, set)) and bool(targets)  # (not a saved adapter's regex)
    return bool(saved) and listed and all(is_under(target, saved) for target in targets)
