"""The choices and defaults the command line's parser shows, copied from the modules that own them.

Those modules import torch, PEFT or `datasets` (seconds of start-up), which `surgical-peft --help` must not pay for a
few names and numbers. Each value here is a copy of its owner's, named in the comment beside it, and
`tests/test_cli_defaults.py` asserts that every copy equals its original, so they cannot drift apart.

Example:
    >>> from surgical_peft.cli.defaults import SHIFTS, TRAINING
    >>> SHIFTS[-1], TRAINING.epochs
    ('none', 10)
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = [
    "DEFAULT_SHIFT",
    "DELTA_DTYPES",
    "DIGITS",
    "LR_MODES",
    "MIXED_PRECISION",
    "PRIVACY",
    "SEVERITIES",
    "SHIFTS",
    "SOURCE_MODEL",
    "TRAINING",
]

SOURCE_MODEL = "demo-resnet"  # experiments.demo.SOURCE_MODEL
DEFAULT_SHIFT = "contrast"  # experiments.demo.DEFAULT_SHIFT
DIGITS = "digits"  # experiments.data.DIGITS
SHIFTS = (  # experiments.data.SHIFTS
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "label-permutation",
    "spurious",
    "subpopulation",
    "none",
)
SEVERITIES = range(1, 6)  # experiments.shifts.SEVERITIES
LR_MODES = ("constant", "rgn")  # training.arguments.LR_MODES
MIXED_PRECISION = ("no", "fp16", "bf16")  # training.arguments.MIXED_PRECISION
DELTA_DTYPES = ("float32", "bfloat16", "float16")  # tuner.config.DELTA_DTYPES

TRAINING = SimpleNamespace(  # the defaults of training.FineTuneArguments() that options show
    strategy="surgical",
    blocks=("head",),
    epochs=10,
    learning_rate=1e-3,
    lr_mode="constant",
    lr_decay=1.0,
    weight_decay=0.0,
    batch_size=32,
    gradient_accumulation_steps=1,
    pseudo_label_threshold=0.2,
    self_train_rounds=1,
    ensemble_size=3,
)
PRIVACY = SimpleNamespace(  # the defaults of privacy.PrivacyArguments that options show
    delta=1e-5,
    steps=100,
    learning_rate=5.0,
    clipping_norm=1.0,
)
