"""The sweep: fine-tune a copy of the model on each candidate block on part of the target data; score = held-out
accuracy. Slow but direct; `BlockRanking.block_seconds` says how slow. `tuned_accuracy` and `tuning_args` are shared
with the `greedy` criterion."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..blocks import unwrap_model
from ..ranking import BlockRanking
from ..training import FineTuneArguments, fine_tune
from ._base import Candidates, RankOptions, holdout_split

__all__ = ["CRITERION", "Sweep", "tuned_accuracy", "tuning_args"]


def tuning_args(options: RankOptions, dataloader: Any) -> FineTuneArguments:
    """How each candidate is fine-tuned: `options.sweep_args`, or 3 epochs with the dataloader's batch size."""
    return options.sweep_args or FineTuneArguments(epochs=3, batch_size=dataloader.batch_size or 32)


def tuned_accuracy(
    base: nn.Module, blocks: Sequence[str], train: Dataset, heldout: Dataset, args: FineTuneArguments
) -> float:
    """Held-out accuracy after fine-tuning a copy of `base` on `blocks` (surgically, the rest frozen) on `train`."""
    run = dataclasses.replace(args, strategy="surgical", blocks=list(blocks), output_dir=None, progress=False)
    return fine_tune(copy.deepcopy(base), train, heldout, run).metrics["eval_accuracy"]


class Sweep:
    """Fine-tune each block in turn (`surgical_peft.training.fine_tune`) and score it by held-out accuracy."""

    name = "sweep"
    description = "sweep: held-out accuracy after fine-tuning only this block"

    def rank(self, model: nn.Module, dataloader: Any, candidates: Candidates, options: RankOptions) -> BlockRanking:
        train, heldout = holdout_split(dataloader, options.holdout_fraction, options.seed, self.name)
        args = tuning_args(options, dataloader)
        base = unwrap_model(model)
        scores, seconds = {}, {}
        for block in tqdm(list(candidates.tensors), desc="sweep", disable=not options.progress):
            start = time.perf_counter()
            scores[block] = tuned_accuracy(base, [block], train, heldout, args)
            seconds[block] = time.perf_counter() - start
        return BlockRanking(self.name, scores, {}, num_examples=len(heldout), block_seconds=seconds)


CRITERION = Sweep()
