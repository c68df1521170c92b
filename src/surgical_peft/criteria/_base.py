"""What every block-ranking criterion gets and gives: the candidate blocks, the options, a `BlockRanking`."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..blocks import BlockMap, unwrap_model
from ..errors import InputError
from ..gradients import batch_count, labelled_batches
from ..ranking import BlockRanking

if TYPE_CHECKING:
    from ..training import FineTuneArguments

__all__ = ["Candidates", "Criterion", "RankOptions", "TensorCriterion", "holdout_split"]


@dataclass
class Candidates:
    """The blocks to rank: the block map, each candidate's parameter names (forward order), name -> parameter."""

    block_map: BlockMap
    tensors: dict[str, list[str]]
    parameters: dict[str, nn.Parameter]


@dataclass
class RankOptions:
    """How to rank (see `surgical_peft.rank_blocks`)."""

    num_batches: int = 4
    sweep_args: FineTuneArguments | None = None
    holdout_fraction: float = 0.25
    seed: int = 0
    progress: bool = True
    greedy_threshold: float = 0.0


def holdout_split(dataloader: Any, holdout_fraction: float, seed: int, criterion: str) -> tuple[Subset, Subset]:
    """The dataloader's dataset cut into a training part and a held-out part of `holdout_fraction` (seeded), for the
    criteria that fine-tune (`sweep`, `greedy`)."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise InputError(
            f"The {criterion} criterion needs a DataLoader over a map-style dataset (it splits the dataset)."
        )
    if not 0 < holdout_fraction < 1:
        raise InputError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    next(labelled_batches(dataloader, 1, torch.device("cpu")))  # the same checks as the gradient criteria
    size = len(dataset)
    held_out = max(1, round(holdout_fraction * size))
    if size - held_out < 1:
        raise InputError(
            f"The {criterion} criterion needs at least 2 examples to train on one part and score on another; got "
            f"{size}."
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[held_out:]), Subset(dataset, order[:held_out])


class Criterion(Protocol):
    """A block-ranking criterion."""

    description: str  # "<short name>: what the score is", shown above a ranking

    def rank(
        self, model: nn.Module, dataloader: Any, candidates: Candidates, options: RankOptions
    ) -> BlockRanking: ...


TensorScores = Callable[[nn.Module, list[str], list[nn.Parameter], Any], tuple[torch.Tensor, int]]
"""`(model, names, parameters, batches) -> (one score per tensor, number of examples seen)`."""


@dataclass(frozen=True)
class TensorCriterion:
    """A criterion that scores every tensor (`tensor_scores`) and gives each block the mean over its tensors."""

    name: str
    description: str
    tensor_scores: TensorScores

    def rank(self, model: nn.Module, dataloader: Any, candidates: Candidates, options: RankOptions) -> BlockRanking:
        names = [name for found in candidates.tensors.values() for name in found]
        chosen = [candidates.parameters[name] for name in names]
        batches = labelled_batches(dataloader, options.num_batches, chosen[0].device)
        if options.progress:
            total = batch_count(dataloader, options.num_batches)
            batches = tqdm(batches, desc=f"{self.name} ranking", total=total, leave=False)
        values, num_examples = self.tensor_scores(unwrap_model(model), names, chosen, batches)
        # A tensor the criterion cannot score (NaN) is left out of its block's mean; a block of such tensors only
        # has no score (NaN, ranked last).
        tensor_scores = {
            name: value for name, value in zip(names, values.tolist(), strict=True) if not math.isnan(value)
        }
        scores = {}
        for block, found in candidates.tensors.items():
            scored = [tensor_scores[name] for name in found if name in tensor_scores]
            scores[block] = sum(scored) / len(scored) if scored else math.nan
        unscored = [name for name in names if name not in tensor_scores]
        return BlockRanking(
            self.name, scores, {}, tensor_scores=tensor_scores, num_examples=num_examples, unscored=unscored
        )
