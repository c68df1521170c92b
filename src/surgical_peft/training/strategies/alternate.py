"""Alternating blocks: several blocks trained one at a time, switching every epoch or every `switch_every` optimizer
steps (e.g. `stage1` and `head` as an encoder and a decoder, updated in turn so that neither drifts far from its
pretrained features).

Every epoch (the default): one phase per epoch, epoch e trains `blocks[e % len(blocks)]`. Every k steps: one phase
of `epochs` epochs whose blocks take turns of k optimizer steps, counted over the run. Either way the run has one
optimizer, so a block's AdamW moments carry on when it comes back; the adapter holds every block.

Example:
    >>> from surgical_peft.training import FineTuneArguments
    >>> args = FineTuneArguments(strategy="alternate", blocks=["stage1", "head"], epochs=3)
    >>> for phase in args.phases():
    ...     print(phase.name, phase.blocks, phase.epochs)
    alternate 1/3 ['stage1'] 1
    alternate 2/3 ['head'] 1
    alternate 3/3 ['stage1'] 1
    >>> [(phase.name, phase.switch_every) for phase in FineTuneArguments(**{**vars(args), "switch_every": 5}).phases()]
    [('alternate every 5 steps', 5)]
    >>> FineTuneArguments(strategy="alternate", blocks=["stage1"])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: strategy='alternate' trains several blocks one at a time; got one: ['stage1'] ...
"""

from __future__ import annotations

from ...blocks import HEAD
from ...errors import InputError
from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]


class Alternate:
    uses_blocks = True
    description = "the blocks one at a time, switching every epoch (or every --switch-every K steps)"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        blocks = list(dict.fromkeys(args.blocks))
        if len(blocks) < 2:
            example = [*blocks, HEAD] if HEAD not in blocks else ["stage1", HEAD]
            raise InputError(
                f"strategy='alternate' trains several blocks one at a time; got one: {blocks} (e.g. blocks={example})."
            )
        if args.switch_every is not None:
            name = f"alternate every {args.switch_every} steps"
            return [Phase(name, blocks, args.epochs, args.learning_rate, switch_every=args.switch_every)]
        return [
            Phase(f"alternate {epoch + 1}/{args.epochs}", [blocks[epoch % len(blocks)]], 1, args.learning_rate)
            for epoch in range(args.epochs)
        ]


STRATEGY = Alternate()
