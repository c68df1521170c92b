"""Linear probing: the head only."""

from __future__ import annotations

from ...blocks import HEAD
from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]


class LinearProbe:
    uses_blocks = False
    description = "the head"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        return [Phase("linear-probe", [HEAD], args.epochs, args.learning_rate)]


STRATEGY = LinearProbe()
