"""The `Accelerator` a run trains with: Accelerate is the distributed engine (DDP, FSDP, DeepSpeed, mixed precision,
gradient accumulation), configured by `accelerate launch`."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs

from ..errors import InputError
from .arguments import FineTuneArguments

__all__ = ["check_mixed_precision", "make_accelerator"]


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
    """An `Accelerator` for `args`: mixed precision, gradient accumulation. (Checkpoints are named and rotated by
    `checkpoint.save_checkpoint`, not by Accelerate, whose rotation deletes the old checkpoint before the new one is
    complete, and whose automatic naming races between processes.)

    Raises:
        InputError: for fp16 on a CPU (`check_mixed_precision`).
    """
    check_mixed_precision(args.mixed_precision, PartialState().device)
    # A block whose output is unused in some forward (e.g. a second head) would otherwise stall DDP.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        kwargs_handlers=[ddp],
    )
