"""What a strategy gives the training loop: its phases."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..arguments import FineTuneArguments

__all__ = ["Phase", "Strategy"]


@dataclass(frozen=True)
class Phase:
    """One phase of a run: its name, the blocks it trains (`["all"]`: every block), its epochs and learning rate.

    Each phase gets its own optimizer (and DDP wrapper), since it trains other tensors."""

    name: str
    blocks: list[str]
    epochs: int
    learning_rate: float


class Strategy(Protocol):
    """A training strategy."""

    description: str  # shown in the command line's help
    uses_blocks: bool  # whether it trains `FineTuneArguments.blocks` (which then may not be empty)

    def phases(self, args: FineTuneArguments) -> list[Phase]: ...
