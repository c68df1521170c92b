"""Alternating blocks: several blocks trained one at a time, switching every epoch (e.g. `stage1` and `head` as an
encoder and a decoder, updated in turn so that neither drifts far from its pretrained features).

One phase per epoch: epoch e trains `blocks[e % len(blocks)]`. Each phase gets its own optimizer, so a block's AdamW
moments restart when it comes back; the adapter holds every block.

Example:
    >>> from surgical_peft.training import FineTuneArguments
    >>> args = FineTuneArguments(strategy="alternate", blocks=["stage1", "head"], epochs=3)
    >>> for phase in args.phases():
    ...     print(phase.name, phase.blocks, phase.epochs)
    alternate 1/3 ['stage1'] 1
    alternate 2/3 ['head'] 1
    alternate 3/3 ['stage1'] 1
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
    description = "the blocks one at a time, switching every epoch"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        blocks = list(dict.fromkeys(args.blocks))
        if len(blocks) < 2:
            example = [*blocks, HEAD] if HEAD not in blocks else ["stage1", HEAD]
            raise InputError(
                f"strategy='alternate' trains several blocks one at a time; got one: {blocks} (e.g. blocks={example})."
            )
        return [
            Phase(f"alternate {epoch + 1}/{args.epochs}", [blocks[epoch % len(blocks)]], 1, args.learning_rate)
            for epoch in range(args.epochs)
        ]


STRATEGY = Alternate()
