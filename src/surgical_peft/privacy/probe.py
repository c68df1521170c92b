"""`private_linear_probe`: NoisyGD of the model's head on its frozen input features, in place, with its privacy
record.

The backbone runs once over the private examples (and once over the public ones when a PCA basis is asked for);
NoisyGD then trains a linear probe on the transformed features from zero, and the probe is folded back into the head's
`nn.Linear`, so that the model (e.g. a `PeftModel` with a surgical adapter on `head`) saves and loads as usual.

Example:
    >>> import torch
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(20)]
    >>> record = private_linear_probe(model, data, PrivacyArguments(epsilon=1.0, delta=1e-3, noise_seed=0))
    >>> record["epsilon"] <= 1.0, record["mechanism"], record["steps"]
    (True, 'NoisyGD', 100)
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..errors import InputError
from .accounting import ACCOUNTANT, check_delta, noise_multiplier, spent_epsilon
from .arguments import PrivacyArguments
from .head import head_inputs, head_linear
from .noisy_descent import noisy_gd
from .transform import FeatureTransform, check_pca_dim

__all__ = ["MECHANISM", "check_private_data", "private_linear_probe"]

MECHANISM = "NoisyGD"
"""The mechanism's name in the privacy record: full-batch noisy gradient descent of the head."""


def check_private_data(model: nn.Module, num_private: int, privacy: PrivacyArguments) -> None:
    """Check what depends on the data before anything runs: delta below 1/n, a linear head, and for `pca_dim` a
    public dataset, and a dimension within the feature size and the public examples.

    Raises:
        InputError: naming the bad value and its valid range.

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> check_private_data(model, 500, PrivacyArguments(epsilon=1.0, delta=1e-3))  # fits: nothing to say
        >>> check_private_data(model, 2000, PrivacyArguments(epsilon=1.0, delta=1e-3))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: delta must be in (0, 1/n) = (0, 0.0005) for n = 2000 private ...
    """
    check_delta(privacy.delta, num_private)
    linear = head_linear(model)
    if privacy.pca_dim is not None and privacy.public_dataset is None:
        raise InputError(
            "pca_dim needs a public dataset to fit the PCA basis on (the source split, or a dataset named as public); "
            "the private target is never used for it."
        )
    if privacy.pca_dim is not None:
        check_pca_dim(privacy.pca_dim, feature_size=linear.in_features, public_size=len(privacy.public_dataset))


def private_linear_probe(
    model: nn.Module,
    train_dataset: Dataset | Sequence[dict[str, Any]],
    privacy: PrivacyArguments,
    *,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Train the model's head by NoisyGD on `train_dataset` (private) and return the privacy record: the spent
    `epsilon`, `delta`, `accountant`, `mechanism`, `noise_multiplier`, `steps`, `sample_rate`, `clipping_norm`.

    Raises:
        InputError: for data that does not fit the settings (see `check_private_data`).

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(20)]
        >>> record = private_linear_probe(model, data, PrivacyArguments(epsilon=1.0, delta=1e-3, feature_norm=True))
        >>> round(record["noise_multiplier"], 1), model.classifier[1].bias.tolist()  # normalised: no bias
        (25.7, [0.0, 0.0])
    """
    check_private_data(model, len(train_dataset), privacy)
    linear = head_linear(model)
    public = None
    if privacy.pca_dim is not None:
        public = head_inputs(model, privacy.public_dataset, batch_size=batch_size)[0]
    transform = FeatureTransform.fit(public, normalise=privacy.feature_norm, pca_dim=privacy.pca_dim)
    features, labels = head_inputs(model, train_dataset, batch_size=batch_size)
    sigma = noise_multiplier(privacy.epsilon, privacy.delta, privacy.steps)
    seed = secrets.randbits(63) if privacy.noise_seed is None else privacy.noise_seed
    weight, bias = noisy_gd(
        transform(features),
        labels,
        linear.out_features,
        steps=privacy.steps,
        learning_rate=privacy.learning_rate,
        clipping_norm=privacy.clipping_norm,
        noise_multiplier=sigma,
        fit_bias=transform.fits_bias and linear.bias is not None,
        generator=torch.Generator().manual_seed(seed),
    )
    weight, bias = transform.fold(weight, bias)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if linear.bias is not None:
            linear.bias.copy_(bias if bias is not None else torch.zeros_like(linear.bias))
    return {
        "epsilon": spent_epsilon(sigma, privacy.steps, privacy.delta),
        "delta": privacy.delta,
        "accountant": ACCOUNTANT,
        "mechanism": MECHANISM,
        "noise_multiplier": sigma,
        "steps": privacy.steps,
        "sample_rate": 1.0,
        "clipping_norm": privacy.clipping_norm,
    }
