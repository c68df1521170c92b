"""Greedy block subsets (SubTuning, Kaplun et al. 2023): grow a set of blocks, not necessarily contiguous, one block
at a time, each time adding the block whose fine-tuning together with the set most improves accuracy on a held-out
part of the target training data; stop when no addition improves it by more than `greedy_threshold`.

Score of a block: the held-out accuracy it gained when it joined the set (the first block: over the untouched model);
for a block that never joined, its gain in the last round, the one that stopped the search (at most the threshold).
So the chosen blocks rank first and `BlockRanking.chosen` lists them in the order they joined. The first round's best
block always joins (the set is never empty), and the search stops right there when it gained no more than the
threshold. Cost: up to n + (n - 1) + ... + 1 fine-tunings for n candidate blocks; `BlockRanking.block_seconds` holds
each block's share, `BlockRanking.seconds` the whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..blocks import unwrap_model
from ..errors import InputError
from ..gradients import labelled_batches
from ..ranking import BlockRanking
from ..training import FineTuneArguments, evaluate_accuracy
from ._base import Candidates, RankOptions, holdout_split
from .sweep import tuned_accuracy, tuning_args

__all__ = ["CRITERION", "Greedy"]


@dataclass
class _Search:
    """What every round of one greedy search shares, and the seconds spent per candidate block."""

    base: nn.Module
    train: Dataset
    heldout: Dataset
    args: FineTuneArguments
    seconds: dict[str, float]
    progress: bool

    def trial_accuracies(self, chosen: list[str], remaining: list[str]) -> dict[str, float]:
        """Held-out accuracy after fine-tuning `chosen` plus each remaining block, per remaining block."""
        accuracies = {}
        description = f"greedy round {len(chosen) + 1}"
        for block in tqdm(remaining, desc=description, disable=not self.progress, leave=False):
            start = time.perf_counter()
            accuracies[block] = tuned_accuracy(self.base, [*chosen, block], self.train, self.heldout, self.args)
            self.seconds[block] += time.perf_counter() - start
        return accuracies

    def untouched_accuracy(self, device: torch.device) -> float:
        """Held-out accuracy of the model as it is, the baseline of the first block's gain."""
        batches = labelled_batches(DataLoader(self.heldout, batch_size=self.args.batch_size), None, device)
        return evaluate_accuracy(self.base, ({"pixel_values": x, "labels": y} for x, y in batches))


def check_threshold(threshold: float) -> float:
    """`threshold`, if it is a held-out accuracy gain in [0, 1); an `InputError` otherwise."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < 1:
        raise InputError(f"greedy_threshold is a held-out accuracy gain in [0, 1); got {threshold!r}.")
    return float(threshold)


class Greedy:
    """Forward greedy selection of a block subset by held-out accuracy (see the module docstring)."""

    name = "greedy"
    description = "greedy: held-out accuracy gained when the block joined the chosen set (others: in the last round)"

    def rank(self, model: nn.Module, dataloader: Any, candidates: Candidates, options: RankOptions) -> BlockRanking:
        threshold = check_threshold(options.greedy_threshold)
        train, heldout = holdout_split(dataloader, options.holdout_fraction, options.seed, self.name)
        remaining = list(candidates.tensors)
        search = _Search(
            unwrap_model(model),
            train,
            heldout,
            tuning_args(options, dataloader),
            dict.fromkeys(remaining, 0.0),
            options.progress,
        )
        accuracy = search.untouched_accuracy(next(iter(candidates.parameters.values())).device)
        chosen: list[str] = []
        gains: dict[str, float] = {}
        while remaining:
            trials = search.trial_accuracies(chosen, remaining)
            round_gains = {block: trials[block] - accuracy for block in remaining}
            best = max(remaining, key=round_gains.__getitem__)  # the first best in forward order
            joins = round_gains[best] > threshold
            if joins or not chosen:  # the first round's best joins anyway: the set is never empty
                chosen.append(best)
                remaining.remove(best)
                accuracy, gains[best] = trials[best], round_gains.pop(best)
            if not joins:
                gains.update(round_gains)  # the blocks left, scored by this last round
                break
        scores = {block: gains[block] for block in candidates.tensors}
        return BlockRanking(
            self.name, scores, {}, num_examples=len(heldout), block_seconds=search.seconds, chosen=chosen
        )


CRITERION = Greedy()
