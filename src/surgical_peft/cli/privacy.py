"""The command line's privacy options (`--strategy dp-linear-probe` and `dp-surgical`): the budget, NoisyGD's
settings, and the public data a PCA basis is fitted on.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser()
    >>> add_privacy_arguments(parser)
    >>> args = parser.parse_args(["--epsilon", "2", "--feature-norm"])
    >>> args.strategy = "dp-linear-probe"
    >>> privacy = privacy_arguments(args)
    >>> privacy.epsilon, privacy.delta, privacy.feature_norm
    (2.0, 1e-05, True)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..training import STRATEGIES  # the registry, light: a member is imported when asked for
from .defaults import DIGITS, PRIVACY

if TYPE_CHECKING:  # imported where they run, so that the parser (`--help`) stays fast
    from ..privacy import PrivacyArguments
    from ..training import FineTuneArguments

__all__ = [
    "add_privacy_arguments",
    "card_rows",
    "check_private_run",
    "needs_source_half",
    "privacy_arguments",
    "public_dataset",
]

PRIVATE_STRATEGY = "dp-linear-probe"
_DEFAULTS = PRIVACY
_OPTIONS = {"epsilon": "--epsilon", "feature_norm": "--feature-norm", "pca_dim": "--pca-dim",
            "public_dataset": "--public-dataset"}  # fmt: skip


def add_privacy_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `--strategy dp-linear-probe` to `parser`."""
    group = parser.add_argument_group("differential privacy (--strategy dp-linear-probe, dp-surgical)")
    group.add_argument("--epsilon", type=float, help="privacy budget epsilon, in (0, 1e100] (required)")
    group.add_argument(
        "--delta",
        type=float,
        default=_DEFAULTS.delta,
        help="privacy budget delta, below 1/train-n (default: %(default)s)",
    )
    group.add_argument(
        "--feature-norm", action="store_true", help="L2-normalise the head's input features (dp-linear-probe)"
    )
    group.add_argument(
        "--pca-dim", type=int, help="project the features on this many principal directions of the public data"
    )
    group.add_argument(
        "--public-dataset",
        help="public dataset (Hub id or imagefolder) the PCA basis is fitted on (default for digits: its source half)",
    )
    group.add_argument(
        "--dp-steps", type=int, default=_DEFAULTS.steps, help="NoisyGD steps, dp-linear-probe (default: %(default)s)"
    )
    group.add_argument(
        "--dp-lr",
        type=float,
        default=_DEFAULTS.learning_rate,
        help="NoisyGD learning rate, dp-linear-probe (default: %(default)s; dp-surgical uses --lr)",
    )
    group.add_argument(
        "--clipping-norm",
        type=float,
        default=_DEFAULTS.clipping_norm,
        help="per-example gradient norm bound (default: %(default)s)",
    )


def _privacy_fields(strategy: str) -> tuple[str, ...]:
    """The `PrivacyArguments` fields `strategy` reads (none for a strategy that is not differentially private)."""
    return getattr(STRATEGIES.get(strategy), "privacy_fields", ())


def _check_options_apply(args: argparse.Namespace) -> None:
    """An `InputError` naming each privacy option given that `args.strategy` does not read, and the strategies that
    do (from the strategy registry)."""
    given = [name for name in _OPTIONS if getattr(args, name) not in (None, False)]
    misplaced = [name for name in given if name not in _privacy_fields(args.strategy)]
    if misplaced:
        users = {name: [s for s in STRATEGIES.names if name in _privacy_fields(s)] for name in misplaced}
        applies = "; ".join(f"{_OPTIONS[name]} applies to --strategy {' or '.join(users[name])}" for name in misplaced)
        raise InputError(f"{applies}, not to {args.strategy}.")


def privacy_arguments(args: argparse.Namespace) -> PrivacyArguments | None:
    """The `PrivacyArguments` the options describe (`None` for another strategy); without its public dataset, which
    `public_dataset` loads once the model is.

    Raises:
        InputError: for a bad budget or setting, privacy options with another strategy, or `--pca-dim` without public
            data.
    """
    _check_options_apply(args)
    if not _privacy_fields(args.strategy):
        return None
    if args.epsilon is None:
        raise InputError(f"--strategy {args.strategy} needs --epsilon, the privacy budget (a number in (0, 1e100]).")
    if args.pca_dim is not None and args.public_dataset is None and args.dataset != DIGITS:
        raise InputError(
            f"--pca-dim needs public data to fit the basis on: pass --public-dataset (only the built-in {DIGITS!r} "
            "has a public source half); the private target is never used for it."
        )
    from ..privacy import PrivacyArguments

    return PrivacyArguments(
        epsilon=args.epsilon,
        delta=args.delta,
        feature_norm=args.feature_norm,
        pca_dim=args.pca_dim,
        steps=args.dp_steps,
        learning_rate=args.dp_lr,
        clipping_norm=args.clipping_norm,
    )


def needs_source_half(args: argparse.Namespace) -> bool:
    """Whether the run's public data is the source half of the dataset: `--pca-dim` without `--public-dataset`."""
    return args.strategy == PRIVATE_STRATEGY and args.pca_dim is not None and args.public_dataset is None


def public_dataset(args: argparse.Namespace, source: Any, preprocess: Callable[[Any], Any]) -> Any | None:
    """The preprocessed public examples for `--pca-dim`: `--public-dataset`, else the built-in digits' `source`
    half (clean digits, what the built-in model was pretrained on); `None` when no PCA is asked for."""
    if args.strategy != PRIVATE_STRATEGY or args.pca_dim is None:
        return None
    if needs_source_half(args):
        return preprocess(source)
    from ..experiments.data import load_image_dataset

    public = load_image_dataset(
        args.public_dataset, split=args.split, image_column=args.image_column, label_column=args.label_column
    )
    return preprocess(public)


def check_private_run(model: Any, num_private: int, args: FineTuneArguments) -> None:
    """What a private strategy checks against the model and the data before anything is written.

    Raises:
        InputError: for delta >= 1/n, a PCA dimension out of range, a head that is not linear (`dp-linear-probe`), or
            a block holding BatchNorm (`dp-surgical`).
    """
    from ..privacy import check_delta, check_private_data
    from ..training.strategies.dp_surgical import check_blocks

    if args.strategy == PRIVATE_STRATEGY:
        check_private_data(model, num_private, args.privacy)
    else:
        check_delta(args.privacy.delta, num_private)
        check_blocks(model, args.blocks)


def card_rows(privacy: dict[str, Any]) -> dict[str, Any]:
    """The privacy record as rows of the model card's recipe table.

    Example:
        >>> card_rows({"epsilon": 0.99, "delta": 1e-5, "accountant": "gdp", "mechanism": "NoisyGD", "steps": 100})
        {'privacy': '(0.99, 1e-05)-DP, NoisyGD, gdp accountant', 'privacy steps': 100}
    """
    rows = {"privacy": f"({privacy['epsilon']:.3g}, {privacy['delta']:.3g})-DP, {privacy['mechanism']}, "
                       f"{privacy['accountant']} accountant"}  # fmt: skip
    details = ("noise_multiplier", "steps", "sample_rate", "clipping_norm")
    return {**rows, **{f"privacy {key}": privacy[key] for key in details if key in privacy}}
