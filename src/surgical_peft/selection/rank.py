"""Which block to tune: rank a model's blocks on a few labelled target batches (Lee et al., ICLR 2023, section 5),
and resolve `SurgicalConfig(block="auto")` with the ranking. The criteria are in `surgical_peft.criteria`.

Example:
    >>> import torch
    >>> from torch.utils.data import DataLoader
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import rank_blocks
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
    ...                                                   num_labels=2))
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
    >>> ranking = rank_blocks(model, DataLoader(data, batch_size=4), "rgn", progress=False)
    >>> list(ranking.scores)
    ['embedder', 'stage1', 'stage2', 'head']
    >>> len(ranking.best(2))
    2
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader

from ..blocks import AUTO, list_blocks, unwrap_model
from ..criteria import CRITERIA
from ..criteria._base import Candidates, RankOptions
from ..errors import InputError
from ..ranking import BlockRanking
from ..tuner.config import SurgicalConfig

if TYPE_CHECKING:
    from ..training import FineTuneArguments

__all__ = ["rank_blocks", "select_blocks"]


def _candidates(model: nn.Module, blocks: Sequence[str] | None) -> Candidates:
    """The candidate blocks' parameter names (block -> names, forward order) and name -> parameter."""
    base = unwrap_model(model)
    block_map = list_blocks(base)
    names = list(block_map) if blocks is None else list(blocks)
    block_map.target_modules(names)  # raises on unknown names, listing the valid ones
    parameters = {name: p for name, p in base.named_parameters() if p.is_floating_point()}
    tensors: dict[str, list[str]] = {block: [] for block in names}
    for name in parameters:
        block = block_map.block_of(name)
        if block in tensors:
            tensors[block].append(name)
    tensors = {block: found for block, found in tensors.items() if found}
    if not tensors:
        raise InputError(
            f"No candidate block holds trainable (floating-point) parameters; candidates: {names or 'none'}.\n"
            f"{block_map}"
        )
    return Candidates(block_map, tensors, parameters)


def rank_blocks(
    model: nn.Module,
    dataloader: DataLoader,
    criterion: str = "rgn",
    *,
    num_batches: int = 4,
    blocks: Sequence[str] | None = None,
    sweep_args: FineTuneArguments | None = None,
    holdout_fraction: float = 0.25,
    seed: int = 0,
    greedy_threshold: float = 0.0,
    progress: bool = True,
) -> BlockRanking:
    """Rank a model's blocks for surgical fine-tuning on labelled target data (see the module docstring).

    Args:
        model: a transformers image classifier or a `PeftModel` around one (any model returning `.logits` for
            `pixel_values` whose blocks `surgical_peft.list_blocks` finds).
        dataloader: batches of `{"pixel_values", "labels"}` from the target distribution.
        criterion: `"rgn"`, `"snr"`, `"sweep"` or `"greedy"` (a block subset, `BlockRanking.chosen`).
        num_batches: batches the gradient criteria average over (`"sweep"` and `"greedy"` use the whole dataset).
        blocks: candidate blocks (default: all of them).
        sweep_args: `"sweep"` and `"greedy"`: how each candidate is fine-tuned (default: 3 epochs at learning rate
            1e-3 with the dataloader's batch size); `strategy` and `blocks` are set per candidate.
        holdout_fraction: `"sweep"` and `"greedy"`: share of the dataset held out to score each candidate.
        seed: `"sweep"` and `"greedy"`: seed of the held-out split.
        greedy_threshold: `"greedy"` only: the search stops when no block improves held-out accuracy by more than
            this, in [0, 1).
        progress: show a progress bar.

    Returns:
        A `BlockRanking`: `print` it, `.best(k)`, `.plot(path)`, `.to_dict()`.

    Raises:
        ValueError: on an unknown criterion or block, an empty dataloader, batches without labels, candidate
            blocks without parameters, or a `greedy_threshold` outside [0, 1).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
        >>> ranking = rank_blocks(model, DataLoader(data, batch_size=4), "snr", progress=False)
        >>> sorted(ranking.scores) == sorted(ranking.num_parameters) == ['embedder', 'head', 'stage1']
        True
    """
    ranker = CRITERIA.get(criterion)
    candidates = _candidates(model, blocks)
    options = RankOptions(num_batches, sweep_args, holdout_fraction, seed, progress, greedy_threshold)
    start = time.perf_counter()
    ranking = ranker.rank(model, dataloader, candidates, options)
    ranking.num_parameters = {block: candidates.block_map.num_parameters[block] for block in ranking.scores}
    ranking.seconds = time.perf_counter() - start
    return ranking


def select_blocks(model: nn.Module, dataloader: DataLoader, config: SurgicalConfig, **kwargs: Any) -> SurgicalConfig:
    """Resolve `SurgicalConfig(block="auto")`: a copy of `config` whose `block` is the top-ranked block(s).

    The blocks are ranked by `rank_blocks(model, dataloader, config.auto_criterion, **kwargs)` and the best
    `config.auto_top_k` kept; a criterion that chooses a subset itself (`"greedy"`) gives that subset instead, in
    forward order, and `auto_top_k` is not used.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from peft import get_peft_model
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import SurgicalConfig, select_blocks
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
        >>> config = select_blocks(model, DataLoader(data, batch_size=4), SurgicalConfig(block="auto"),
        ...                        progress=False)
        >>> config.block in ("embedder", "stage1", "head")
        True
        >>> peft_model = get_peft_model(model, config)
    """
    if config.blocks != [AUTO]:
        raise InputError(f"select_blocks resolves SurgicalConfig(block='auto'); this one has block={config.block!r}.")
    ranking = rank_blocks(model, dataloader, config.auto_criterion, **kwargs)
    if ranking.degenerate:
        warnings.warn(
            f"block='auto': the {ranking.criterion} ranking is degenerate: {ranking.degenerate}.", stacklevel=2
        )
    chosen = [block for block in ranking.scores if block in ranking.chosen] or ranking.best(config.auto_top_k)
    return dataclasses.replace(config, block=chosen[0] if len(chosen) == 1 else chosen)
