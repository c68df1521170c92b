"""The choices and defaults the command line's parser shows that are owned by heavy modules, copied.

Those modules import torch, PEFT or `datasets` (seconds of start-up), which `surgical-peft --help` must not pay for a
few names and numbers. Each value here is a copy of its owner's, named in the comment beside it, and
`tests/test_cli_defaults.py` asserts that every copy equals its original, so they cannot drift apart.

Example:
    >>> from surgical_peft.cli.defaults import CORRUPTIONS, SHIFTS
    >>> SHIFTS[-1], CORRUPTIONS[0]
    ('none', 'gaussian_noise')
"""

from __future__ import annotations

__all__ = ["CORRUPTIONS", "DEFAULT_SHIFT", "DIGITS", "SEVERITIES", "SHIFTS", "SOURCE_MODEL"]

SOURCE_MODEL = "demo-resnet"  # experiments.demo.SOURCE_MODEL
DEFAULT_SHIFT = "contrast"  # experiments.demo.DEFAULT_SHIFT
DIGITS = "digits"  # experiments.data.DIGITS
CORRUPTIONS = (  # experiments.shifts.CORRUPTIONS
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
)
SHIFTS = (*CORRUPTIONS, "label-permutation", "spurious", "subpopulation", "none")  # experiments.data.SHIFTS
SEVERITIES = range(1, 6)  # experiments.shifts.SEVERITIES
