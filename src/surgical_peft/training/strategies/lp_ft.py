"""LP-FT (Kumar et al., ICLR 2022): linear-probe the head first (at 10x the learning rate), then fine-tune the chosen
blocks together with the head."""

from __future__ import annotations

from ...blocks import HEAD
from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]

_PROBE_LEARNING_RATE_FACTOR = 10


class LinearProbeThenFineTune:
    uses_blocks = True
    description = "the head, then the blocks and the head"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        tuned = [*args.blocks, HEAD] if HEAD not in args.blocks else list(args.blocks)
        lp_epochs = args.lp_epochs if args.lp_epochs is not None else args.epochs
        return [
            Phase("linear-probe", [HEAD], lp_epochs, _PROBE_LEARNING_RATE_FACTOR * args.learning_rate),
            Phase("fine-tune", tuned, args.epochs, args.learning_rate),
        ]


STRATEGY = LinearProbeThenFineTune()
