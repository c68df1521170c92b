"""Differentially private fine-tuning: NoisyGD of the head on frozen features (Wang et al., ICML 2024).

| module | what |
|---|---|
| `accounting.py` | noise calibration and spent epsilon: exact Gaussian-DP composition of full-batch steps |
| `arguments.py` | `PrivacyArguments`: the budget and the NoisyGD settings |
| `transform.py` | `FeatureTransform`: L2 normalisation, a public PCA basis, the probe folded into the head |
| `noisy_descent.py` | `noisy_gd`: full-batch NoisyGD of a linear softmax probe |
| `head.py` | the head's `nn.Linear` and its input features, computed once |
| `probe.py` | `private_linear_probe`: all of it, in place on a model, with its privacy record |

Its names are imported on first use, so that `PrivacyArguments` (the command line's options) loads without torch.

Example:
    >>> from surgical_peft.privacy import PrivacyArguments, noise_multiplier
    >>> round(noise_multiplier(epsilon=8.0, delta=1e-5, steps=100), 2)
    6.0
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = [
    "ACCOUNTANT",
    "MECHANISM",
    "FeatureTransform",
    "PrivacyArguments",
    "check_delta",
    "check_epsilon",
    "check_private_data",
    "head_inputs",
    "head_linear",
    "noise_multiplier",
    "noisy_gd",
    "private_linear_probe",
    "spent_epsilon",
]

_LAZY = {
    "ACCOUNTANT": "accounting",
    "MECHANISM": "probe",
    "FeatureTransform": "transform",
    "PrivacyArguments": "arguments",
    "check_delta": "accounting",
    "check_epsilon": "accounting",
    "check_private_data": "probe",
    "head_inputs": "head",
    "head_linear": "head",
    "noise_multiplier": "accounting",
    "noisy_gd": "noisy_descent",  # (a module named as the function would hide it once imported)
    "private_linear_probe": "probe",
    "spent_epsilon": "accounting",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
