"""Options that several commands share, defined once: the target data (`--shift`, `--severity`, `--train-n`,
`--seed`) and the cache of the built-in model (`--cache-dir`).

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_target_options(parser, train_n=150)
    >>> args = parser.parse_args(["--shift", "fog", "--severity", "3"])
    >>> args.shift, args.severity, args.train_n, args.seed
    ('fog', 3, 150, 0)
"""

from __future__ import annotations

from typing import Any

from .defaults import DEFAULT_SHIFT, SEVERITIES, SHIFTS, SOURCE_MODEL

__all__ = ["MODEL_HELP", "add_cache_dir_option", "add_target_options"]

MODEL_HELP = (
    "a Hub model id (read from the local cache when offline), a local directory saved with save_pretrained, "
    f"or the built-in {SOURCE_MODEL} (the demo's small ResNet for 32x32 digits)"
)


def add_target_options(group: Any, *, train_n: int, shift: str = DEFAULT_SHIFT) -> None:
    """`--shift`, `--severity`, `--train-n` and `--seed` on `group` (a parser or an argument group)."""
    group.add_argument(
        "--shift", choices=SHIFTS, default=shift, metavar="SHIFT", help=f"target shift: {', '.join(SHIFTS)}"
    )
    group.add_argument(
        "--severity", type=int, choices=SEVERITIES, default=SEVERITIES[-1], help="corruption severity, 1-5"
    )
    group.add_argument("--train-n", type=int, default=train_n, help="labelled target training images")
    group.add_argument("--seed", type=int, default=0, help="seed of the data splits, the shift and the training")


def add_cache_dir_option(group: Any) -> None:
    """`--cache-dir`: where the built-in model is cached once pretrained."""
    group.add_argument(
        "--cache-dir",
        help=f"cache of the built-in {SOURCE_MODEL} (default: $SURGICAL_PEFT_CACHE or ~/.cache/surgical_peft)",
    )
