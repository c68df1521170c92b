"""What a strategy gives the training loop: its phases, or, for a `SelfRunningStrategy`, the whole run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ...errors import InputError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel

    from ...privacy import PrivacyArguments
    from ..arguments import FineTuneArguments, FineTuneResult
    from ..loop import Examples

__all__ = ["Phase", "SelfRunningStrategy", "Strategy", "private_run_settings"]


@dataclass(frozen=True)
class Phase:
    """One phase of a run: its name, the blocks it trains (`["all"]`: every block), its epochs and learning rate;
    with `switch_every`, it trains its blocks one at a time, in turn, switching every `switch_every` optimizer steps.

    Each phase gets its own DDP wrapper, since it trains other tensors; consecutive phases at the same learning rate
    share one optimizer (the AdamW state of a block carries on across them)."""

    name: str
    blocks: list[str]
    epochs: int
    learning_rate: float
    switch_every: int | None = None


class Strategy(Protocol):
    """A training strategy. A differentially private one also has `privacy_fields`: the `PrivacyArguments` fields
    it reads (the command line refuses the others with it)."""

    description: str  # shown in the command line's help
    uses_blocks: bool  # whether it trains `FineTuneArguments.blocks` (which then may not be empty)

    def phases(self, args: FineTuneArguments) -> list[Phase]: ...


class SelfRunningStrategy(Strategy, Protocol):
    """A strategy that does not run minibatch epochs (e.g. full-batch NoisyGD): `fine_tune` hands it the model with
    its surgical adapter (`FineTuneArguments.adapter_blocks()`, from `phases`) and returns what `run` returns."""

    def run(
        self,
        model: PeftModel,
        train_dataset: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        accelerator: Accelerator,
    ) -> FineTuneResult: ...


def private_run_settings(
    strategy: str, args: FineTuneArguments, accelerator: Accelerator, why: str
) -> PrivacyArguments:
    """`args.privacy` for a differentially private `strategy`, which trains on one process (`why`); an `InputError`
    if there are none, or several processes."""
    if args.privacy is None:
        raise InputError(f"strategy={strategy!r} needs privacy=PrivacyArguments(epsilon=...).")
    if accelerator.num_processes > 1:
        raise InputError(
            f"{strategy} trains on one process ({why}); run it without accelerate launch, not on "
            f"{accelerator.num_processes} processes."
        )
    return args.privacy
