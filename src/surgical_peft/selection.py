"""Which block to tune: rank a model's blocks on a few labelled target batches (Lee et al., ICLR 2023, section 5).

Three criteria, all computed on the *target* data, before any fine-tuning:

- `"rgn"` (Auto-RGN): for every parameter tensor, the relative gradient norm ||g|| / ||w|| of the target loss,
  averaged over `num_batches` batches. A block's score is the mean over its tensors: every layer counts once, whatever
  its size, so a block is not ranked by its single largest convolution and blocks of very different sizes (a ResNet
  stem and its last stage differ by 100x) stay comparable; the block-level ratio of norms would be dominated by the
  largest tensors. `relative_gradient_norms` gives the per-tensor values; the training loop's `lr_mode="rgn"` scales
  each tensor's learning rate by them, as the paper does.
- `"snr"` (Auto-SNR): for every tensor, the signal-to-noise ratio of its per-example gradients: for each entry, the
  squared mean over examples divided by the variance over examples, averaged over the tensor's entries. Gradients
  that agree across examples (a consistent direction to move in) score high; noise scores about 1 / number of
  examples. Per-example gradients come from `torch.func` (`functional_call` + `vmap` + `grad`). A block's score is the
  mean over its tensors; `BlockRanking.tensor_mask(threshold)` masks the low-SNR tensors (those below `threshold`
  times the largest tensor score), which is how Auto-SNR tunes a subset of tensors across the whole model.
- `"sweep"`: fine-tune a copy of the model on each candidate block in turn (`training.fine_tune`, a few epochs) on
  part of the target data and score it by accuracy on the held-out rest. Slow but direct; `BlockRanking.seconds`
  says how slow.

Gradients are taken with the model in eval mode (BatchNorm uses its running statistics, which therefore never move)
and with respect to every candidate block's parameters, frozen or not; afterwards the model's weights, buffers,
`requires_grad` flags and train/eval modes are as they were, and no `.grad` is written.

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

import copy
import dataclasses
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from .blocks import BlockMap, _format_count, list_blocks, unwrap_model
from .config import AUTO_CRITERIA, SurgicalConfig
from .training import FineTuneArguments, fine_tune

__all__ = ["CRITERIA", "BlockRanking", "rank_blocks", "relative_gradient_norms", "select_blocks"]

CRITERIA = AUTO_CRITERIA
"""The ranking criteria: `"rgn"`, `"snr"` and `"sweep"`."""

_DESCRIPTIONS = {
    "rgn": "Auto-RGN: mean relative gradient norm ||g||/||w|| of the block's tensors",
    "snr": "Auto-SNR: mean gradient signal-to-noise ratio of the block's tensors",
    "sweep": "sweep: held-out accuracy after fine-tuning only this block",
}
_WEIGHT_NORM_FLOOR = 1e-12  # a tensor of zeros (a fresh bias) has no relative scale: its norm is floored
_VARIANCE_FLOOR = 1e-30  # entries whose gradient is always 0 get SNR 0 rather than 0/0
_PER_EXAMPLE_CHUNK = 8  # examples whose per-example gradients are held in memory at once


@dataclass
class BlockRanking:
    """Scores of a model's blocks under one criterion (higher is better), as `rank_blocks` returns them.

    Attributes:
        criterion: `"rgn"`, `"snr"` or `"sweep"`.
        scores: block -> score, in forward order.
        num_parameters: block -> number of parameters.
        tensor_scores: parameter name -> score for `"rgn"` and `"snr"` (empty for `"sweep"`).
        num_examples: target examples the scores were computed on (`"sweep"`: the held-out ones).
        seconds: wall-clock time the ranking took.
        block_seconds: `"sweep"` only: block -> seconds its fine-tuning took.

    Example:
        >>> ranking = BlockRanking("rgn", {"stage1": 0.2, "head": 0.5}, {"stage1": 1200, "head": 40})
        >>> ranking.best()
        ['head']
        >>> print(ranking)
        Auto-RGN: mean relative gradient norm ||g||/||w|| of the block's tensors
          rank  block        score  params
             2  stage1         0.2  1.2K
             1  head           0.5  40      <- best
    """

    criterion: str
    scores: dict[str, float]
    num_parameters: dict[str, int]
    tensor_scores: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    seconds: float = 0.0
    block_seconds: dict[str, float] = field(default_factory=dict)

    def ranked(self) -> list[str]:
        """All blocks, best first; ties keep forward order (the earlier block first)."""
        return sorted(self.scores, key=lambda block: -_sortable(self.scores[block]))  # sorted() keeps ties' order

    def _ranks(self) -> dict[str, int]:
        return {block: position for position, block in enumerate(self.ranked(), start=1)}

    def best(self, k: int = 1) -> list[str]:
        """The `k` best blocks, best first (all of them when `k` exceeds their number)."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}.")
        return self.ranked()[:k]

    def tensor_mask(self, threshold: float = 0.5) -> dict[str, bool]:
        """Which tensors to tune: `True` where the tensor's score is at least `threshold` times the largest one.

        This is Auto-SNR's masking of low-SNR tensors (also usable with `"rgn"`); pass the kept tensors' modules to
        `SurgicalConfig(target_modules=...)` to tune only them.

        Example:
            >>> ranking = BlockRanking("snr", {"a": 1.0}, {"a": 2}, tensor_scores={"a.weight": 0.9, "a.bias": 0.1})
            >>> ranking.tensor_mask(0.5)
            {'a.weight': True, 'a.bias': False}
        """
        if not self.tensor_scores:
            raise ValueError(f"The {self.criterion!r} criterion scores blocks, not tensors: there is no tensor mask.")
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a fraction of the largest score, in [0, 1]; got {threshold}.")
        largest = max(self.tensor_scores.values())
        return {name: score >= threshold * largest for name, score in self.tensor_scores.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form: the criterion, one row per block (forward order, with its rank), timings."""
        rank = self._ranks()
        return {
            "criterion": self.criterion,
            "description": _DESCRIPTIONS[self.criterion],
            "blocks": [
                {"block": block, "score": score, "num_parameters": self.num_parameters[block], "rank": rank[block]}
                for block, score in self.scores.items()
            ],
            "tensor_scores": dict(self.tensor_scores),
            "num_examples": self.num_examples,
            "seconds": self.seconds,
            "block_seconds": dict(self.block_seconds),
        }

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save a bar chart of the block scores (forward order, the best block highlighted) to `path`.

        Needs matplotlib: `pip install 'surgical-peft[plots]'`.
        """
        from .plots import bar_chart

        return bar_chart(
            self.scores,
            path,
            title=title or _DESCRIPTIONS[self.criterion],
            ylabel=_DESCRIPTIONS[self.criterion].split(":")[0] + " score",
            highlight=self.best(1)[0],
        )

    def __str__(self) -> str:
        rank = self._ranks()
        best = self.best(1)[0] if self.scores else None
        width = max([5, *(len(block) for block in self.scores)])
        lines = [_DESCRIPTIONS[self.criterion]]
        if self.num_examples:
            lines[0] += f" ({self.num_examples} examples, {self.seconds:.1f} s)"
        lines.append(f"  rank  {'block':<{width}}  {'score':>10}  params")
        for block, score in self.scores.items():
            marker = "  <- best" if block == best else ""
            count = _format_count(self.num_parameters[block])
            lines.append(f"  {rank[block]:>4}  {block:<{width}}  {score:>10.4g}  {count:<6}{marker}".rstrip())
        return "\n".join(lines)


def _sortable(score: float) -> float:
    return -math.inf if math.isnan(score) else score


# ------------------------------------------------------------------------------------------------------- helpers
def _candidates(model: nn.Module, blocks: Sequence[str] | None) -> tuple[BlockMap, dict[str, list[str]], dict]:
    """The block map, the candidate blocks' parameter names (block -> names, forward order) and name -> parameter."""
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
        raise ValueError(
            f"No candidate block holds trainable (floating-point) parameters; candidates: {names or 'none'}.\n"
            f"{block_map}"
        )
    return block_map, tensors, parameters


def _batches(dataloader: Any, num_batches: int | None, device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`(pixel_values, labels)` of the first `num_batches` batches (all with `None`), on `device`; checks them."""
    if num_batches is not None and num_batches < 1:
        raise ValueError(f"num_batches must be at least 1, got {num_batches}.")
    count = 0
    for batch in dataloader:
        if not isinstance(batch, Mapping) or "pixel_values" not in batch or "labels" not in batch:
            found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
            raise ValueError(
                "Ranking blocks needs labelled target batches: dicts with 'pixel_values' and 'labels' "
                f"(e.g. from surgical_peft.data.preprocess); got {found}."
            )
        yield batch["pixel_values"].to(device), torch.as_tensor(batch["labels"]).to(device)
        count += 1
        if count == num_batches:
            return
    if count == 0:
        raise ValueError("The dataloader is empty: ranking blocks needs at least one labelled target batch.")


@contextmanager
def _probing(model: nn.Module, parameters: Sequence[nn.Parameter]) -> Iterator[None]:
    """Eval mode and `requires_grad=True` on `parameters` for the duration; both restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    flags = [(parameter, parameter.requires_grad) for parameter in parameters]
    model.eval()
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).logits


def _rgn(
    model: nn.Module, parameters: Sequence[nn.Parameter], batches: Iterator[tuple[torch.Tensor, ...]]
) -> tuple[torch.Tensor, int]:
    """Per-tensor ||g|| / ||w|| averaged over `batches`, and the number of examples seen."""
    weight_norms = torch.stack([p.detach().float().norm() for p in parameters]).clamp_min(_WEIGHT_NORM_FLOOR)
    total = torch.zeros_like(weight_norms)
    num_batches = num_examples = 0
    with _probing(model, parameters), torch.enable_grad():
        for pixel_values, labels in batches:
            loss = F.cross_entropy(_logits(model, pixel_values), labels)
            grads = torch.autograd.grad(loss, parameters, allow_unused=True)
            norms = [g.detach().float().norm() if g is not None else torch.zeros(()) for g in grads]
            total += torch.stack([n.to(total.device) for n in norms]) / weight_norms
            num_batches += 1
            num_examples += len(labels)
    return total / num_batches, num_examples


def _snr(
    model: nn.Module,
    names: Sequence[str],
    parameters: Sequence[nn.Parameter],
    batches: Iterator[tuple[torch.Tensor, ...]],
) -> tuple[torch.Tensor, int]:
    """Per-tensor mean over entries of mean_g^2 / var_g over examples, and the number of examples seen."""
    detached = {name: p.detach() for name, p in zip(names, parameters, strict=True)}
    sums = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in detached.items()}
    squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in detached.items()}

    def example_loss(params: dict[str, torch.Tensor], pixel_values: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, args=(), kwargs={"pixel_values": pixel_values.unsqueeze(0)}).logits
        return F.cross_entropy(logits, label.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    count = 0
    with _probing(model, []):
        for pixel_values, labels in batches:
            for start in range(0, len(labels), _PER_EXAMPLE_CHUNK):
                chunk = slice(start, start + _PER_EXAMPLE_CHUNK)
                for name, g in per_example(detached, pixel_values[chunk], labels[chunk]).items():
                    g = g.double()
                    sums[name] += g.sum(0)
                    squares[name] += (g * g).sum(0)
            count += len(labels)
    if count < 2:
        raise ValueError(f"The SNR criterion needs at least 2 target examples to measure a variance, got {count}.")
    scores = []
    for name in names:
        mean = sums[name] / count
        variance = (squares[name] / count - mean * mean).clamp_min(0) * count / (count - 1)
        scores.append(float((mean * mean / (variance + _VARIANCE_FLOOR)).mean()))
    return torch.tensor(scores), count


# ------------------------------------------------------------------------------------------------------ public API
def relative_gradient_norms(
    model: nn.Module,
    dataloader: Any,
    *,
    parameters: Sequence[nn.Parameter] | None = None,
    num_batches: int = 4,
    accelerator: Accelerator | None = None,
) -> list[float]:
    """Relative gradient norm ||g|| / ||w|| of the target loss for each tensor, averaged over a few batches (Auto-RGN).

    The model may be wrapped by DDP or be a `PeftModel`; gradients are taken on the unwrapped model in eval mode and
    leave weights, buffers, `requires_grad`, modes and `.grad` untouched. With an `accelerator` running several
    processes, each averages over its own batches and the results are averaged over processes, so all ranks agree.

    Args:
        model: a model returning `.logits` for `pixel_values`.
        dataloader: batches of `{"pixel_values", "labels"}`.
        parameters: the tensors to measure (default: every parameter that requires grad), in the order of the result.
        num_batches: batches to average over.
        accelerator: the `Accelerator` the model was prepared with, if any.

    Returns:
        One value per tensor of `parameters`, in order.

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(4)]
        >>> head = [model.classifier[1].weight]
        >>> norms = relative_gradient_norms(model, DataLoader(data, batch_size=2), parameters=head)
        >>> len(norms), norms[0] > 0
        (1, True)
    """
    module = unwrap_model(model)
    parameters = list(parameters) if parameters is not None else [p for p in module.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("No parameters to measure: none was given and none requires grad.")
    values, _ = _rgn(module, parameters, _batches(dataloader, num_batches, parameters[0].device))
    if accelerator is not None and accelerator.num_processes > 1:
        values = accelerator.reduce(values.to(accelerator.device), reduction="mean")
    return values.tolist()


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
    progress: bool = True,
) -> BlockRanking:
    """Rank a model's blocks for surgical fine-tuning on labelled target data (see the module docstring).

    Args:
        model: a transformers image classifier or a `PeftModel` around one (any model returning `.logits` for
            `pixel_values` whose blocks `surgical_peft.list_blocks` finds).
        dataloader: batches of `{"pixel_values", "labels"}` from the target distribution.
        criterion: `"rgn"`, `"snr"` or `"sweep"`.
        num_batches: batches the gradient criteria average over (`"sweep"` uses the whole dataset).
        blocks: candidate blocks (default: all of them).
        sweep_args: `"sweep"` only: how each block is fine-tuned (default: 3 epochs at learning rate 1e-3 with the
            dataloader's batch size); `strategy` and `blocks` are set per candidate.
        holdout_fraction: `"sweep"` only: share of the dataset held out to score each block.
        seed: `"sweep"` only: seed of the held-out split.
        progress: show a progress bar.

    Returns:
        A `BlockRanking`: `print` it, `.best(k)`, `.plot(path)`, `.to_dict()`.

    Raises:
        ValueError: on an unknown criterion or block, an empty dataloader, batches without labels, or candidate
            blocks without parameters.

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
    if criterion not in CRITERIA:
        raise ValueError(f"Unknown criterion {criterion!r}. Valid: {', '.join(CRITERIA)}.")
    block_map, tensors, parameters = _candidates(model, blocks)
    start = time.perf_counter()
    if criterion == "sweep":
        ranking = _sweep(model, dataloader, list(tensors), sweep_args, holdout_fraction, seed, progress)
    else:
        names = [name for found in tensors.values() for name in found]
        chosen = [parameters[name] for name in names]
        module = unwrap_model(model)
        batches = _batches(dataloader, num_batches, chosen[0].device)
        if progress:
            batches = tqdm(batches, desc=f"{criterion} ranking", total=num_batches, leave=False)
        values, num_examples = (
            _rgn(module, chosen, batches) if criterion == "rgn" else _snr(module, names, chosen, batches)
        )
        tensor_scores = dict(zip(names, values.tolist(), strict=True))
        scores = {block: sum(tensor_scores[n] for n in found) / len(found) for block, found in tensors.items()}
        ranking = BlockRanking(criterion, scores, {}, tensor_scores=tensor_scores, num_examples=num_examples)
    ranking.num_parameters = {block: block_map.num_parameters[block] for block in ranking.scores}
    ranking.seconds = time.perf_counter() - start
    return ranking


def _sweep(
    model: nn.Module,
    dataloader: DataLoader,
    blocks: list[str],
    sweep_args: FineTuneArguments | None,
    holdout_fraction: float,
    seed: int,
    progress: bool,
) -> BlockRanking:
    """Fine-tune a copy of the model on each block on part of the dataset; score = accuracy on the rest."""
    dataset = getattr(dataloader, "dataset", None)
    if dataset is None or not hasattr(dataset, "__len__"):
        raise ValueError("The sweep criterion needs a DataLoader over a map-style dataset (it splits the dataset).")
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}.")
    next(_batches(dataloader, 1, torch.device("cpu")))  # the same checks as the gradient criteria
    size = len(dataset)
    held_out = max(1, round(holdout_fraction * size))
    if size - held_out < 1:
        raise ValueError(f"The sweep needs at least 2 examples to train on one part and score on another; got {size}.")
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    train, heldout = Subset(dataset, order[held_out:]), Subset(dataset, order[:held_out])
    args = sweep_args or FineTuneArguments(epochs=3, batch_size=dataloader.batch_size or 32)
    base = unwrap_model(model)
    scores, seconds = {}, {}
    for block in tqdm(blocks, desc="sweep", disable=not progress):
        start = time.perf_counter()
        run = dataclasses.replace(args, strategy="surgical", blocks=[block], output_dir=None, progress=False)
        result = fine_tune(copy.deepcopy(base), train, heldout, run)
        scores[block] = result.metrics["eval_accuracy"]
        seconds[block] = time.perf_counter() - start
    return BlockRanking("sweep", scores, {}, num_examples=held_out, block_seconds=seconds)


def select_blocks(model: nn.Module, dataloader: DataLoader, config: SurgicalConfig, **kwargs: Any) -> SurgicalConfig:
    """Resolve `SurgicalConfig(block="auto")`: a copy of `config` whose `block` is the top-ranked block(s).

    The blocks are ranked by `rank_blocks(model, dataloader, config.auto_criterion, **kwargs)` and the best
    `config.auto_top_k` kept.

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
    if config.blocks != ["auto"]:
        raise ValueError(f"select_blocks resolves SurgicalConfig(block='auto'); this one has block={config.block!r}.")
    chosen = rank_blocks(model, dataloader, config.auto_criterion, **kwargs).best(config.auto_top_k)
    return dataclasses.replace(config, block=chosen[0] if len(chosen) == 1 else chosen)
