"""`BlockRanking`: the scores of a model's blocks under one criterion, as `rank_blocks` returns them.

Example:
    >>> from surgical_peft.ranking import BlockRanking
    >>> BlockRanking("snr", {"stage1": 0.3, "head": 0.1}, {"stage1": 1200, "head": 40}).best()
    ['stage1']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .blocks import format_count
from .criteria import CRITERIA
from .errors import InputError
from .plots import bar_chart

__all__ = ["BlockRanking"]


@dataclass
class BlockRanking:
    """Scores of a model's blocks under one criterion (higher is better), as `rank_blocks` returns them.

    Attributes:
        criterion: `"rgn"`, `"snr"`, `"sweep"` or `"greedy"`.
        scores: block -> score, in forward order.
        num_parameters: block -> number of parameters.
        tensor_scores: parameter name -> score for `"rgn"` and `"snr"` (empty for `"sweep"`).
        num_examples: target examples the scores were computed on (`"sweep"`, `"greedy"`: the held-out ones).
        seconds: wall-clock time the ranking took.
        block_seconds: `"sweep"`, `"greedy"`: block -> seconds its fine-tuning took (`"greedy"`: over all rounds).
        chosen: `"greedy"` only: the block subset the criterion chose, in the order the blocks joined (they rank
            first); `select_blocks` tunes it. Empty for the criteria that only score.
        unscored: tensors the criterion could not score, left out of their blocks' means (`"rgn"`: tensors without
            a scale, such as biases initialised to zeros, see `surgical_peft.gradients.SCALE_FLOOR`); a block with no
            scored tensor has no score (NaN, ranked last).

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
    chosen: list[str] = field(default_factory=list)
    unscored: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        """What the scores are, e.g. `"Auto-RGN: mean relative gradient norm ||g||/||w|| of the block's tensors"`."""
        return CRITERIA.get(self.criterion).description

    @property
    def degenerate(self) -> str:
        """Why the scores single out no best block, or `""` when they do: no block has a score, or several share the
        best one (e.g. every score is 0); `best()` then names the first of them in forward order.

        Example:
            >>> BlockRanking("rgn", {"stage1": 0.0, "head": 0.0}, {"stage1": 1200, "head": 40}).degenerate
            'stage1 and head tie at the top (0); the first in forward order is named best'
        """
        if self.chosen:  # a criterion that chooses a subset has chosen
            return ""
        if not any(math.isfinite(score) for score in self.scores.values()):
            return "no block has a score"
        top = self.scores[self.ranked()[0]]
        tied = [block for block in self.ranked() if self.scores[block] == top]
        if len(tied) > 1:
            ties = f"{', '.join(tied[:-1])} and {tied[-1]}"
            return f"{ties} tie at the top ({top:.4g}); the first in forward order is named best"
        return ""

    def ranked(self) -> list[str]:
        """All blocks, best first; ties keep forward order (the earlier block first)."""
        return sorted(self.scores, key=lambda block: -_sortable(self.scores[block]))  # sorted() keeps ties' order

    def _ranks(self) -> dict[str, int]:
        return {block: position for position, block in enumerate(self.ranked(), start=1)}

    def best(self, k: int = 1) -> list[str]:
        """The `k` best blocks, best first (all of them when `k` exceeds their number)."""
        if k < 1:
            raise InputError(f"k must be at least 1, got {k}.")
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
            raise InputError(f"The {self.criterion!r} criterion scores blocks, not tensors: there is no tensor mask.")
        if not 0 <= threshold <= 1:
            raise InputError(f"threshold is a fraction of the largest score, in [0, 1]; got {threshold}.")
        largest = max(self.tensor_scores.values())
        return {name: score >= threshold * largest for name, score in self.tensor_scores.items()}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable form: the criterion, one row per block (forward order, with its rank), timings."""
        rank = self._ranks()
        return {
            "criterion": self.criterion,
            "description": self.description,
            "blocks": [
                {
                    "block": block,
                    "score": score if math.isfinite(score) else None,
                    "num_parameters": self.num_parameters[block],
                    "rank": rank[block],
                }
                for block, score in self.scores.items()
            ],
            "tensor_scores": dict(self.tensor_scores),
            "num_examples": self.num_examples,
            "seconds": self.seconds,
            "block_seconds": dict(self.block_seconds),
            "chosen": list(self.chosen),
            "unscored": list(self.unscored),
            "degenerate": self.degenerate,
        }

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save a bar chart of the block scores (forward order, the best block highlighted) to `path`.

        Needs matplotlib: `pip install 'surgical-peft[plots]'`.
        """
        return bar_chart(
            self.scores,
            path,
            title=title or self.description,
            ylabel=self.description.split(":")[0] + " score",
            highlight=self.best(1)[0],
        )

    def __str__(self) -> str:
        rank = self._ranks()
        marked = (self.chosen or self.best(1)[:1]) if self.scores else []
        marker = "  <- chosen" if self.chosen else "  <- best"
        width = max([5, *(len(block) for block in self.scores)])
        lines = [self.description]
        if self.num_examples:
            lines[0] += f" ({self.num_examples} examples, {self.seconds:.1f} s)"
        lines.append(f"  rank  {'block':<{width}}  {'score':>10}  params")
        for block, score in self.scores.items():
            count = format_count(self.num_parameters[block])
            mark = marker if block in marked else ""
            lines.append(f"  {rank[block]:>4}  {block:<{width}}  {score:>10.4g}  {count:<6}{mark}".rstrip())
        if self.unscored:
            names = ", ".join(self.unscored[:3]) + (
                f", ... ({len(self.unscored)} in all)" if len(self.unscored) > 3 else ""
            )
            lines.append(
                f"  without a score, left out of their blocks' means (no scale, e.g. a bias of zeros): {names}"
            )
        if self.degenerate:
            lines.append(f"  degenerate ranking: {self.degenerate}")
        return "\n".join(lines)


def _sortable(score: float) -> float:
    return -math.inf if math.isnan(score) else score
