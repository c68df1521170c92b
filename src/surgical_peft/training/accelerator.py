"""The `Accelerator` a run trains with: Accelerate is the distributed engine (DDP, FSDP, DeepSpeed, mixed precision,
gradient accumulation), configured by `accelerate launch`."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs

from ..blocks import ALL, BlockMap
from ..errors import InputError
from .arguments import FineTuneArguments
from .tracking import project_configuration

__all__ = ["check_mixed_precision", "make_accelerator", "may_leave_parameters_unused", "set_unused_parameter_search"]


def check_mixed_precision(mixed_precision: str | None, device: torch.device) -> None:
    """Refuse fp16 on a CPU, where Accelerate silently trains in float32. `None`: as `accelerate launch` configured.

    Example:
        >>> check_mixed_precision("fp16", torch.device("cpu"))
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: mixed_precision='fp16' needs a GPU: on a CPU, Accelerate trains in float32 ...
    """
    mode = mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION")
    if mode == "fp16" and device.type == "cpu":
        raise InputError(
            "mixed_precision='fp16' needs a GPU: on a CPU, Accelerate trains in float32 with it, changing nothing. "
            "Use 'bf16' (supported on CPUs) or 'no'."
        )


def make_accelerator(args: FineTuneArguments) -> Accelerator:
    """An `Accelerator` for `args`: mixed precision, gradient accumulation, the trackers of `args.report_to`
    (`surgical_peft.training.tracking`, which starts them). (Checkpoints are named and rotated by
    `checkpoint.save_checkpoint`, not by Accelerate, whose rotation deletes the old checkpoint before the new one is
    complete, and whose automatic naming races between processes.)

    Raises:
        InputError: for fp16 on a CPU (`check_mixed_precision`).
    """
    check_mixed_precision(args.mixed_precision, PartialState().device)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[DistributedDataParallelKwargs()],  # set per phase by `set_unused_parameter_search`
        log_with=args.report_to or None,
        project_config=project_configuration(args),
    )


def may_leave_parameters_unused(blocks: list[str], block_map: BlockMap, *, switches: bool = False) -> bool:
    """Whether a phase training `blocks` can hold a trainable parameter that a forward pass does not reach, so that
    DDP must look for unused parameters after every forward (`find_unused_parameters=True`; without it, DDP waits
    for their gradients forever; with it needlessly, every rank warns that it found none).

    The rule: every phase is wrapped in DDP anew with only its own blocks trainable (`strategies.Phase`), so blocks
    frozen for a while (`alternate`, `gradual`, LP-FT's probe) are never DDP's concern. A trained parameter goes
    unreached only where a model keeps tensors that a classifier's forward uses for optional inputs or other heads
    alone: in the whole model (`all`: e.g. an unused pooler) and in its first block, the stem or embeddings (e.g.
    the `mask_token` of ViT-like models, used for masked image modelling only). Any other block is on every forward
    path. A phase that `switches` which of its blocks train between steps (`alternate` with `switch_every`) leaves
    the resting blocks without gradients while DDP waits for them: it needs the search too.

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft.blocks import list_blocks
        >>> blocks = list_blocks(ResNetForImageClassification(ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1])))
        >>> [may_leave_parameters_unused(chosen, blocks) for chosen in (["stage1"], ["embedder"], ["all"])]
        [False, True, True]
    """
    return switches or blocks == [ALL] or next(iter(block_map)) in blocks


def set_unused_parameter_search(
    accelerator: Accelerator, blocks: list[str], block_map: BlockMap, *, switches: bool = False
) -> None:
    """Ask DDP to search for unused parameters in the next `prepare` exactly when `may_leave_parameters_unused`."""
    if accelerator.ddp_handler is not None:
        search = may_leave_parameters_unused(blocks, block_map, switches=switches)
        accelerator.ddp_handler.find_unused_parameters = search
