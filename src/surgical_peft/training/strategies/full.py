"""Full fine-tuning: every block (the adapter then holds deltas for the whole model)."""

from __future__ import annotations

from ...blocks import ALL
from ..arguments import FineTuneArguments
from ._base import Phase

__all__ = ["STRATEGY"]


class Full:
    uses_blocks = False
    description = "every block"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        return [Phase("fine-tune", [ALL], args.epochs, args.learning_rate)]


STRATEGY = Full()
