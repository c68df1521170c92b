"""The sweep: fine-tune a copy of the model on each candidate block on part of the target data; score = held-out
accuracy. Slow but direct; `BlockRanking.block_seconds` says how slow."""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import Subset
from tqdm.auto import tqdm

from ..blocks import unwrap_model
from ..errors import InputError
from ..gradients import labelled_batches
from ..ranking import BlockRanking
from ..training import FineTuneArguments, fine_tune
from ._base import Candidates, RankOptions

__all__ = ["CRITERION", "Sweep"]


def _split(dataloader: Any, holdout_fraction: float, seed: int) -> tuple[Subset, Subset]:
    """The dataloader's dataset cut into a training part and a held-out part of `holdout_fraction`."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise InputError("The sweep criterion needs a DataLoader over a map-style dataset (it splits the dataset).")
    if not 0 < holdout_fraction < 1:
        raise InputError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    next(labelled_batches(dataloader, 1, torch.device("cpu")))  # the same checks as the gradient criteria
    size = len(dataset)
    held_out = max(1, round(holdout_fraction * size))
    if size - held_out < 1:
        raise InputError(f"The sweep needs at least 2 examples to train on one part and score on another; got {size}.")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, order[held_out:]), Subset(dataset, order[:held_out])


class Sweep:
    """Fine-tune each block in turn (`surgical_peft.training.fine_tune`) and score it by held-out accuracy."""

    name = "sweep"
    description = "sweep: held-out accuracy after fine-tuning only this block"

    def rank(self, model: nn.Module, dataloader: Any, candidates: Candidates, options: RankOptions) -> BlockRanking:
        train, heldout = _split(dataloader, options.holdout_fraction, options.seed)
        args = options.sweep_args or FineTuneArguments(epochs=3, batch_size=dataloader.batch_size or 32)
        base = unwrap_model(model)
        scores, seconds = {}, {}
        for block in tqdm(list(candidates.tensors), desc="sweep", disable=not options.progress):
            start = time.perf_counter()
            run = dataclasses.replace(args, strategy="surgical", blocks=[block], output_dir=None, progress=False)
            scores[block] = fine_tune(copy.deepcopy(base), train, heldout, run).metrics["eval_accuracy"]
            seconds[block] = time.perf_counter() - start
        return BlockRanking(self.name, scores, {}, num_examples=len(heldout), block_seconds=seconds)


CRITERION = Sweep()
