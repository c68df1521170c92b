"""Surgical fine-tuning: the chosen blocks only."""

from __future__ import annotations

from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]


class Surgical:
    uses_blocks = True
    description = "the blocks only"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        return [Phase("fine-tune", list(args.blocks), args.epochs, args.learning_rate)]


STRATEGY = Surgical()
