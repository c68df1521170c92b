"""Differentially private fine-tuning: NoisyGD of the head on frozen features (Wang et al., ICML 2024).

| module | what |
|---|---|
| `accounting.py` | noise calibration and spent epsilon: exact Gaussian-DP composition of full-batch steps |
| `arguments.py` | `PrivacyArguments`: the budget and the NoisyGD settings |
| `transform.py` | `FeatureTransform`: L2 normalisation, a public PCA basis, the probe folded into the head |
| `noisy_gd.py` | `noisy_gd`: full-batch NoisyGD of a linear softmax probe |
| `head.py` | the head's `nn.Linear` and its input features, computed once |
| `probe.py` | `private_linear_probe`: all of it, in place on a model, with its privacy record |

Example:
    >>> from surgical_peft.privacy import PrivacyArguments, noise_multiplier
    >>> round(noise_multiplier(epsilon=8.0, delta=1e-5, steps=100), 2)
    6.0
"""

from .accounting import ACCOUNTANT, check_delta, check_epsilon, noise_multiplier, spent_epsilon
from .arguments import PrivacyArguments
from .head import head_inputs, head_linear
from .noisy_gd import noisy_gd
from .probe import MECHANISM, check_private_data, private_linear_probe
from .transform import FeatureTransform

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
