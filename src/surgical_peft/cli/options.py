"""Options that several commands share, defined once: the target data (`--shift`, `--severity`, `--train-n`,
`--seed`), how a dataset is read (`--split`, columns, unreadable images) and the cache of the built-in model
(`--cache-dir`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_target_options(parser, train_n=150)
    >>> args = parser.parse_args(["--shift", "fog", "--severity", "3"])
    >>> args.shift, args.severity, args.train_n, args.seed
    ('fog', 3, 150, 0)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from .defaults import DEFAULT_SHIFT, SEVERITIES, SHIFTS, SOURCE_MODEL

__all__ = ["MODEL_HELP", "add_cache_dir_option", "add_dataset_options", "add_target_options"]

MODEL_HELP = (
    "a Hub model id (read from the local cache when offline), a local directory saved with save_pretrained, "
    f"or the built-in {SOURCE_MODEL} (the demo's small ResNet for 32x32 digits)"
)


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An `argparse` type: a whole number of at least `low` (and at most `high`), or a message saying so.

    Example:
        >>> whole_number(1)("3"), whole_number(1, 10)("10")
        (3, 10)
    """
    bounds = f"of at least {low}" if high is None else f"from {low} to {high}"

    def parse(value: str) -> int:
        number = int(value) if value.strip().lstrip("+-").isdigit() else None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {value!r}")
        return number

    return parse


def add_target_options(
    group: Any, *, train_n: int, shift: str | None = DEFAULT_SHIFT, severity: int | None = SEVERITIES[-1]
) -> None:
    """`--shift`, `--severity`, `--train-n` and `--seed` on `group` (a parser or an argument group).

    `shift=None` and `severity=None` leave the defaults to `surgical_peft.cli.target.resolve_shift`: the demo's shift
    for the built-in demo, none for your own model or data."""
    shift_default = f"default: {shift}" if shift else f"default: {DEFAULT_SHIFT} for the built-in demo, else none"
    group.add_argument(
        "--shift",
        choices=SHIFTS,
        default=shift,
        metavar="SHIFT",
        help=f"target shift: {', '.join(SHIFTS)} ({shift_default})",
    )
    group.add_argument(
        "--severity",
        type=int,
        choices=SEVERITIES,
        default=severity,
        help=f"corruption severity, 1-5 (default: {severity or SEVERITIES[-1]}; for a corruption only)",
    )
    group.add_argument("--train-n", type=int, default=train_n, help="labelled target training images")
    group.add_argument("--seed", type=int, default=0, help="seed of the data splits, the shift and the training")


def add_dataset_options(group: Any) -> None:
    """`--split`, `--image-column`, `--label-column` and `--skip-unreadable-images`: how a dataset is read."""
    group.add_argument("--split", default="train", help="dataset split to use (default: %(default)s)")
    group.add_argument("--image-column", help="image column (default: the first datasets.Image column)")
    group.add_argument("--label-column", help="label column (default: the first ClassLabel column)")
    group.add_argument(
        "--skip-unreadable-images",
        action="store_true",
        help="leave out images that cannot be decoded (named in a warning) instead of stopping",
    )


def add_cache_dir_option(group: Any) -> None:
    """`--cache-dir`: where the built-in model is cached once pretrained."""
    group.add_argument(
        "--cache-dir",
        help=f"cache of the built-in {SOURCE_MODEL} (default: $SURGICAL_PEFT_CACHE or ~/.cache/surgical_peft)",
    )
