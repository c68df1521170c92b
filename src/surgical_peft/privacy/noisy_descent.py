"""NoisyGD: full-batch gradient descent of a linear softmax classifier with clipped per-example gradients and
Gaussian noise (the mechanism Wang et al., ICML 2024, study on frozen features).

A linear probe's per-example gradient of the cross-entropy is the outer product `[x_i, 1] (p_i - y_i)^T`, whose
norm is `||[x_i, 1]|| * ||p_i - y_i||`: clipping every example to `clipping_norm` and summing takes two matrix
products per step, without materialising per-example gradients. Each step adds noise of standard deviation
`noise_multiplier * clipping_norm` to the sum, the Gaussian mechanism that `accounting` composes.

Example:
    >>> import torch
    >>> generator = torch.Generator().manual_seed(0)
    >>> features = torch.randn(200, 5, generator=generator)
    >>> labels = (features[:, 0] > 0).long()
    >>> weight, bias = noisy_gd(features, labels, 2, steps=50, learning_rate=5.0, clipping_norm=1.0,
    ...                         noise_multiplier=1.0, generator=generator)
    >>> accuracy = ((features @ weight.T + bias).argmax(1) == labels).float().mean().item()
    >>> accuracy > 0.9
    True
"""

from __future__ import annotations

import math

import torch

__all__ = ["noisy_gd"]


def noisy_gd(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    steps: int,
    learning_rate: float,
    clipping_norm: float,
    noise_multiplier: float,
    fit_bias: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Train `weight` (num_classes x d) and `bias` (or `None` without `fit_bias`) from zero by NoisyGD.

    Args:
        features: (n, d) private features; labels: (n,) class indices.
        steps: full-batch steps.
        learning_rate: step size on the noisy mean gradient.
        clipping_norm: per-example gradient norm bound (`math.inf`: no clipping, non-private only).
        noise_multiplier: noise std over `clipping_norm` (0: plain gradient descent, non-private).
        generator: the noise's random generator.

    Example:
        >>> import math, torch
        >>> features, labels = torch.randn(100, 4), torch.arange(100) % 3
        >>> settings = {"steps": 10, "learning_rate": 1.0, "clipping_norm": 1.0}
        >>> weight, bias = noisy_gd(features, labels, 3, **settings, noise_multiplier=0.0, fit_bias=False)
        >>> weight.shape, bias  # noise_multiplier=0: plain gradient descent, not private
        (torch.Size([3, 4]), None)
        >>> noisy_gd(features, labels, 3, steps=1, learning_rate=1.0, clipping_norm=math.inf, noise_multiplier=1.0)
        Traceback (most recent call last):
        ...
        ValueError: Noise needs a finite clipping_norm: the sensitivity of an unclipped gradient is unbounded.
    """
    if noise_multiplier > 0 and not math.isfinite(clipping_norm):
        raise ValueError("Noise needs a finite clipping_norm: the sensitivity of an unclipped gradient is unbounded.")
    n = features.shape[0]
    inputs = torch.cat([features, features.new_ones(n, 1)], dim=1) if fit_bias else features
    targets = torch.nn.functional.one_hot(labels, num_classes).to(features.dtype)
    theta = features.new_zeros(inputs.shape[1], num_classes)
    input_norms = inputs.norm(dim=1)
    for _ in range(steps):
        residual = torch.softmax(inputs @ theta, dim=1) - targets  # d loss_i / d logits_i
        scale = (clipping_norm / (residual.norm(dim=1) * input_norms).clamp_min(1e-12)).clamp(max=1.0)
        gradient = inputs.T @ (residual * scale[:, None])
        if noise_multiplier > 0:
            noise = torch.randn(gradient.shape, generator=generator, dtype=gradient.dtype, device=gradient.device)
            gradient += noise_multiplier * clipping_norm * noise
        theta -= learning_rate * gradient / n
    weight = theta[: features.shape[1]].T.contiguous()
    return weight, theta[-1].clone() if fit_bias else None
