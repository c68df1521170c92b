"""The `Accelerator` a run trains with: Accelerate is the distributed engine (DDP, FSDP, DeepSpeed, mixed precision,
gradient accumulation), configured by `accelerate launch`."""

from __future__ import annotations

from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

from .arguments import FineTuneArguments

__all__ = ["make_accelerator"]


def make_accelerator(args: FineTuneArguments) -> Accelerator:
    """An `Accelerator` for `args`: checkpoints under `args.output_dir` (the latest kept), mixed precision, gradient
    accumulation."""
    project = ProjectConfiguration(
        project_dir=args.output_dir, automatic_checkpoint_naming=args.output_dir is not None, total_limit=1
    )
    # A block whose output is unused in some forward (e.g. a second head) would otherwise stall DDP.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=project,
        kwargs_handlers=[ddp],
    )
