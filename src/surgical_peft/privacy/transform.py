"""`FeatureTransform`: what NoisyGD sees of the head's inputs (L2-normalised, projected on a public PCA basis), and
how a linear probe trained on it folds back into the model's own head.

Wang et al. (ICML 2024) show that NoisyGD on a frozen backbone's last-layer features gains markedly from normalising
the features and from projecting them on a PCA basis, which must come from public data (the source split, or a
dataset the user declares public), never from the private target.

A linear probe `W z + b` on `z = P^T (x - m)` is the head `(W P^T) x + (b - W P^T m)` on the raw features `x`.
With normalisation, `z = P^T x / ||x||`, the probe has no bias and the basis is not centred: the head `(W P^T) x`
then gives the probe's logits times `||x||`, hence the same predictions, and the result is a plain linear head.

Example:
    >>> import torch
    >>> public = torch.randn(50, 8)
    >>> transform = FeatureTransform.fit(public, normalise=False, pca_dim=3)
    >>> z = transform(torch.randn(4, 8))
    >>> z.shape
    torch.Size([4, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError

__all__ = ["FeatureTransform", "check_pca_dim"]


def check_pca_dim(pca_dim: int, *, feature_size: int, public_size: int) -> None:
    """An `InputError` unless 1 <= `pca_dim` <= min(feature size, public examples).

    Example:
        >>> try:
        ...     check_pca_dim(200, feature_size=128, public_size=898)
        ... except InputError as error:
        ...     print(error)
        pca_dim must be between 1 and 128 (the feature size is 128, the public data has 898 examples), got 200.
    """
    limit = min(feature_size, public_size)
    if not 1 <= pca_dim <= limit:
        raise InputError(
            f"pca_dim must be between 1 and {limit} (the feature size is {feature_size}, the public data has "
            f"{public_size} examples), got {pca_dim}."
        )


def _l2_normalise(features: torch.Tensor) -> torch.Tensor:
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


@dataclass
class FeatureTransform:
    """`z = P^T (n(x) - m)` with `n` the L2 normalisation (or the identity), `m` a public mean (zero when
    normalising) and `P` an orthonormal public PCA basis (`None`: the identity).

    Example:
        >>> import torch
        >>> transform = FeatureTransform.fit(torch.randn(50, 8), normalise=True, pca_dim=3)  # on public features
        >>> features, probe = torch.randn(4, 8), torch.randn(2, 3)  # a probe trained on transform(features)
        >>> head, bias = transform.fold(probe, None)  # the same probe on the raw features
        >>> logits = transform(features) @ probe.T * features.norm(dim=1, keepdim=True)  # the probe's, times ||x||
        >>> transform.fits_bias, bias, torch.allclose(features @ head.T, logits, atol=1e-5)
        (False, None, True)
    """

    normalise: bool = False
    mean: torch.Tensor | None = None
    basis: torch.Tensor | None = None  # (feature size, pca_dim), orthonormal columns

    @property
    def fits_bias(self) -> bool:
        """Whether the probe may have a bias: not on normalised features, where a bias would not fold back."""
        return not self.normalise

    @classmethod
    def fit(cls, public: torch.Tensor | None, *, normalise: bool, pca_dim: int | None) -> FeatureTransform:
        """The transform, its PCA basis (top `pca_dim` principal directions) fitted on the `public` features.

        Raises:
            InputError: if `pca_dim` is given without public features, or exceeds what they allow.
        """
        if pca_dim is None:
            return cls(normalise=normalise)
        if public is None:
            raise InputError(
                "pca_dim needs public data to fit the PCA basis on (the source split, or a dataset named as "
                "public); the private target is never used for it."
            )
        check_pca_dim(pca_dim, feature_size=public.shape[1], public_size=public.shape[0])
        public = _l2_normalise(public) if normalise else public
        mean = None if normalise else public.mean(dim=0)
        centred = public if mean is None else public - mean
        basis = torch.linalg.svd(centred.double(), full_matrices=False).Vh[:pca_dim].T.to(public.dtype)
        return cls(normalise=normalise, mean=mean, basis=basis)

    def __call__(self, features: torch.Tensor) -> torch.Tensor:
        z = _l2_normalise(features) if self.normalise else features
        z = z if self.mean is None else z - self.mean
        return z if self.basis is None else z @ self.basis

    def fold(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The head `(weight, bias)` on raw features that predicts what the probe `(weight, bias)` on `z` does."""
        raw = weight if self.basis is None else weight @ self.basis.T
        if bias is None or self.mean is None:
            return raw, bias
        return raw, bias - raw @ self.mean
