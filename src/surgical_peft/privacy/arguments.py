"""`PrivacyArguments`: the privacy budget and the NoisyGD settings of a private linear probe.

Example:
    >>> PrivacyArguments(epsilon=2.0).delta
    1e-05
    >>> PrivacyArguments(epsilon=0.0)
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: epsilon must be a number in (0, 1e+100], got 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .accounting import check_delta, check_epsilon

if TYPE_CHECKING:
    from torch.utils.data import Dataset

__all__ = ["PrivacyArguments"]


@dataclass
class PrivacyArguments:
    """How to train a private linear probe (`strategy="dp-linear-probe"`).

    Args:
        epsilon: the privacy budget, in (0, 1e100]; the run spends at most this much.
        delta: the budget's delta, in (0, 1) and below 1 / (number of private examples).
        feature_norm: L2-normalise the head's input features (the probe then has no bias; see
            `surgical_peft.privacy.transform`).
        pca_dim: project the features on their top `pca_dim` principal directions, fitted on `public_dataset`.
        public_dataset: public examples (`{"pixel_values", "labels"}`, e.g. the source split), used only to fit the
            PCA basis, which needs it; never the private target.
        steps: full-batch NoisyGD steps (each one spends privacy: more steps, more noise per step).
        learning_rate: NoisyGD step size on the noisy mean gradient.
        clipping_norm: bound on each example's gradient norm (the sensitivity); with `feature_norm`, gradients are
            at most sqrt(2) already, so a bound of sqrt(2) or more clips nothing.
        noise_seed: seeds the noise, for reproducible experiments only (`None`: fresh entropy from the operating
            system; anyone who knows the seed can remove the noise).

    Example:
        >>> privacy = PrivacyArguments(epsilon=1.0, feature_norm=True)
        >>> privacy.delta, privacy.steps, privacy.learning_rate, privacy.clipping_norm
        (1e-05, 100, 5.0, 1.0)
        >>> PrivacyArguments(epsilon=1.0, steps=0)
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: steps must be at least 1, got 0.
    """

    _argument_group_name = "differential privacy (--strategy dp-linear-probe, dp-surgical)"  # the help's section

    epsilon: float = field(
        metadata={"help": "privacy budget epsilon, in (0, 1e100] (required)", "required": False}  # see cli/privacy.py
    )
    delta: float = field(default=1e-5, metadata={"help": "privacy budget delta, below 1/train-n"})
    feature_norm: bool = field(
        default=False, metadata={"help": "L2-normalise the head's input features (dp-linear-probe)"}
    )
    pca_dim: int | None = field(
        default=None, metadata={"help": "project the features on this many principal directions of the public data"}
    )
    public_dataset: Dataset | Sequence[dict[str, Any]] | None = None  # the option names a dataset: DataArguments
    steps: int = field(default=100, metadata={"help": "NoisyGD steps, dp-linear-probe", "option": "--dp-steps"})
    learning_rate: float = field(
        default=5.0,
        metadata={"help": "NoisyGD learning rate, dp-linear-probe (dp-surgical uses --lr)", "option": "--dp-lr"},
    )
    clipping_norm: float = field(default=1.0, metadata={"help": "per-example gradient norm bound"})
    noise_seed: int | None = None

    def __post_init__(self) -> None:
        check_epsilon(self.epsilon)
        check_delta(self.delta)
        if self.steps < 1:
            raise InputError(f"steps must be at least 1, got {self.steps}.")
        for name in ("learning_rate", "clipping_norm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise InputError(f"{name} must be a finite number > 0, got {value!r}.")
        if self.pca_dim is not None and self.pca_dim < 1:
            raise InputError(f"pca_dim must be at least 1, got {self.pca_dim}.")
