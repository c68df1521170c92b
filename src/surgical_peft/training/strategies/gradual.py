"""Gradual unfreezing (ULMFiT, Howard & Ruder 2018): the head first, then one more block per epoch towards the input.

`blocks` are the blocks to unfreeze below the head, in forward order (input first, as `surgical_peft.list_blocks`
lists them): epoch 1 trains the head, epoch 2 the head and the last of `blocks`, and so on; once every block is
unfrozen, the remaining epochs train them all. One phase per stage, all with one optimizer (the head's AdamW moments
carry on from stage to stage); the adapter holds every block.

Example:
    >>> from surgical_peft.training import FineTuneArguments
    >>> args = FineTuneArguments(strategy="gradual", blocks=["stage1", "stage2"], epochs=4)
    >>> for phase in args.phases():
    ...     print(phase.name, phase.blocks, phase.epochs)
    gradual 1/3 ['head'] 1
    gradual 2/3 ['head', 'stage2'] 1
    gradual 3/3 ['head', 'stage2', 'stage1'] 2
"""

from __future__ import annotations

from ...blocks import HEAD
from ...errors import InputError
from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]


class Gradual:
    uses_blocks = True
    description = "the head, then one more block per epoch towards the input"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        below = [block for block in dict.fromkeys(args.blocks) if block != HEAD]
        if not below:
            raise InputError(
                "strategy='gradual' unfreezes blocks below the head, one per epoch; give at least one "
                f"(e.g. blocks=['stage3', 'stage4']), got {args.blocks}."
            )
        stages = len(below) + 1
        if args.epochs < stages:
            raise InputError(
                f"strategy='gradual' unfreezes one block per epoch: the head and {len(below)} block(s) below it need "
                f"at least {stages} epochs, got epochs={args.epochs}."
            )
        unfrozen = [HEAD, *reversed(below)]
        return [
            Phase(
                f"gradual {stage}/{stages}",
                unfrozen[:stage],
                1 if stage < stages else args.epochs - stages + 1,
                args.learning_rate,
            )
            for stage in range(1, stages + 1)
        ]


STRATEGY = Gradual()
