"""`SurgicalConfig`: which block(s) of a pretrained model to fine-tune, everything else frozen."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType

from ..blocks.names import AUTO
from ..criteria import CRITERIA
from ..errors import InputError
from .serialization import check_adapter_file

__all__ = ["DELTA_DTYPES", "SurgicalConfig"]

DELTA_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class SurgicalConfig(PeftConfig):
    """Configuration of a surgical fine-tuning adapter (Lee et al., ICLR 2023).

    Surgical fine-tuning trains one small contiguous block of a pretrained model and freezes the rest. The adapter
    saved by `save_pretrained` holds only the tuned block's deltas (tuned minus base weights, plus its BatchNorm
    running statistics).

    Args:
        block: a block name or a list of them, resolved against the model by `surgical_peft.list_blocks`, e.g.
            `"stage1"` or `["embedder", "stage1"]` on ResNet, `"layer12"` or `"head"` on ViT; `"all"` tunes every block
            (full fine-tuning, stored as deltas); `"auto"` picks the block(s) from target data: resolve it with
            `surgical_peft.select_blocks(model, dataloader, config)` before `get_peft_model`. The resolved module
            paths are written to `target_modules`, which is what a saved adapter records.
        target_modules: module names (exact or suffix match) or a regex, with PEFT's usual semantics; every parameter
            and persistent buffer under a matched module is tuned. Works on any `torch.nn.Module`. When both are given,
            `block` must resolve to the same modules.
        exclude_modules: module names or a regex of modules not to tune, as in PEFT.
        modules_to_save: modules that are trained and saved in full rather than as deltas, e.g. a classification head
            newly initialised for a different number of labels (its weights differ on every fresh base).
        delta_dtype: dtype the parameters' deltas are stored in: `None` keeps each tensor's own dtype;
            `"bfloat16"` or `"float16"` halves their bytes. Buffers (BatchNorm statistics) keep their dtype.
        base_fingerprint: hashes of the base weights, per block, filled in when the adapter is created; loading the
            adapter onto a different base raises an error that names the blocks that differ.
        verify_base: set to `False` to load an adapter onto a base whose fingerprint differs, e.g.
            `PeftModel.from_pretrained(model, path, verify_base=False)`. Never saved.
        auto_criterion: how `block="auto"` ranks the blocks: `"rgn"` (Auto-RGN), `"snr"` (Auto-SNR), `"sweep"`, or
            `"greedy"` (a greedily grown block subset, tuned as chosen); see `surgical_peft.rank_blocks`.
        auto_top_k: how many of the best-ranked blocks `block="auto"` tunes (not used by `"greedy"`).

    Example:
        >>> from surgical_peft import SurgicalConfig
        >>> SurgicalConfig(block="stage1").peft_type.value
        'SURGICAL'
    """

    block: str | list[str] | None = field(
        default=None, metadata={"help": "Block name(s) to tune, e.g. 'stage1'; see surgical_peft.list_blocks(model)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the modules to tune (PEFT semantics)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to tune."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. a newly initialised classifier."}
    )
    delta_dtype: str | None = field(
        default=None, metadata={"help": f"dtype of the saved deltas, one of {DELTA_DTYPES}; None keeps the weights'."}
    )
    base_fingerprint: dict[str, Any] | None = field(
        default=None, metadata={"help": "Hashes of the base weights per block, recorded when the adapter is created."}
    )
    verify_base: bool = field(
        default=True, metadata={"help": "Refuse to load onto a base whose fingerprint differs. Not saved."}
    )
    auto_criterion: str = field(
        default="rgn", metadata={"help": f"How block='auto' ranks blocks, one of {CRITERIA.names}."}
    )
    auto_top_k: int = field(default=1, metadata={"help": "How many top-ranked blocks block='auto' tunes."})

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SURGICAL
        if isinstance(self.block, (list, tuple)):
            self.block = list(self.block)
            if not self.block or not all(isinstance(name, str) for name in self.block):
                raise InputError(f"`block` must be a block name or a non-empty list of them, got {self.block!r}.")
        elif self.block is not None and not isinstance(self.block, str):
            raise TypeError(f"`block` must be a str or a list of str, got {type(self.block).__name__}.")
        if AUTO in self.blocks and len(self.blocks) > 1:
            raise InputError(f"block='auto' picks the blocks itself and cannot be combined with others: {self.block}.")
        if self.auto_criterion not in CRITERIA.names:
            raise InputError(f"Unknown auto_criterion {self.auto_criterion!r}. Valid: {', '.join(CRITERIA.names)}.")
        if isinstance(self.auto_top_k, bool) or not isinstance(self.auto_top_k, int) or self.auto_top_k < 1:
            raise InputError(f"auto_top_k must be an int of at least 1, got {self.auto_top_k!r}.")
        if self.delta_dtype not in (None, *DELTA_DTYPES):
            raise InputError(f"Unknown delta_dtype {self.delta_dtype!r}. Valid: None, {', '.join(DELTA_DTYPES)}.")
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = list(self.target_modules)

    @property
    def blocks(self) -> list[str]:
        """`block` as a list (empty when the adapter is defined by `target_modules` alone)."""
        if self.block is None:
            return []
        return [self.block] if isinstance(self.block, str) else list(self.block)

    @property
    def delta_torch_dtype(self) -> torch.dtype | None:
        """`delta_dtype` as a `torch.dtype` (`None`: each tensor keeps its own)."""
        return getattr(torch, self.delta_dtype) if self.delta_dtype else None

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> SurgicalConfig:
        """`PeftConfig.from_pretrained`; for a local adapter it also checks that the weights file is complete, so that
        `PeftModel.from_pretrained` (which loads the config first) refuses a corrupt file before it changes the model.
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        weights = Path(pretrained_model_name_or_path, subfolder or "", SAFETENSORS_WEIGHTS_NAME)
        if weights.is_file():
            check_adapter_file(weights)
        return config

    def to_dict(self) -> dict[str, Any]:
        """The saved form: everything but `verify_base`, which is a loading-time choice."""
        output = super().to_dict()
        output.pop("verify_base", None)
        return output
