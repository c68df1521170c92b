"""The command line's privacy options (`--strategy dp-linear-probe` and `dp-surgical`): the budget and NoisyGD's
settings are `PrivacyArguments`' fields, turned into `PrivacyArguments` only for a private strategy.

Example:
    >>> import argparse
    >>> from surgical_peft.argparser import add_dataclass_arguments
    >>> from surgical_peft.privacy import PrivacyArguments
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_arguments(parser, PrivacyArguments)
    >>> options = parser.parse_args(["--epsilon", "2", "--feature-norm"])
    >>> privacy = privacy_arguments(options, "dp-linear-probe", dataset="digits", public_dataset=None)
    >>> privacy.epsilon, privacy.delta, privacy.feature_norm
    (2.0, 1e-05, True)
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ..argparser import dataclass_from_options, option_fields
from ..errors import InputError
from ..privacy.arguments import PrivacyArguments
from ..training import STRATEGIES  # the registry, light: a member is imported when asked for
from .defaults import DIGITS

if TYPE_CHECKING:  # imported where they run, so that the parser (`--help`) stays fast
    from ..training import FineTuneArguments

__all__ = ["PRIVATE_STRATEGY", "card_rows", "check_private_run", "privacy_arguments"]

PRIVATE_STRATEGY = "dp-linear-probe"
_APPLY = {"epsilon": "--epsilon", "feature_norm": "--feature-norm", "pca_dim": "--pca-dim",
          "public_dataset": "--public-dataset"}  # fmt: skip


def _privacy_fields(strategy: str) -> tuple[str, ...]:
    """The `PrivacyArguments` fields `strategy` reads (none for a strategy that is not differentially private)."""
    return getattr(STRATEGIES.get(strategy), "privacy_fields", ())


def _check_options_apply(given: list[str], strategy: str) -> None:
    """An `InputError` naming each privacy option `given` that `strategy` does not read, and the strategies that do
    (from the strategy registry)."""
    misplaced = [name for name in given if name not in _privacy_fields(strategy)]
    if misplaced:
        users = {name: [s for s in STRATEGIES.names if name in _privacy_fields(s)] for name in misplaced}
        applies = "; ".join(f"{_APPLY[name]} applies to --strategy {' or '.join(users[name])}" for name in misplaced)
        raise InputError(f"{applies}, not to {strategy}.")


def privacy_arguments(
    options: argparse.Namespace, strategy: str, *, dataset: str, public_dataset: str | None
) -> PrivacyArguments | None:
    """The `PrivacyArguments` that parsed `options` describe for `strategy` (`None` for a strategy that is not
    private); `dataset` and `public_dataset` are the run's (`DataArguments`). The public data itself is loaded with the
    target (`surgical_peft.cli.target`).

    Raises:
        InputError: for a bad budget or setting, privacy options with another strategy, or `--pca-dim` without public
            data.
    """
    values = {field.name: getattr(options, field.name) for field in option_fields(PrivacyArguments)}
    values["public_dataset"] = public_dataset
    _check_options_apply([name for name in _APPLY if values[name] not in (None, False)], strategy)
    if not _privacy_fields(strategy):
        return None
    if values["epsilon"] is None:
        raise InputError(f"--strategy {strategy} needs --epsilon, the privacy budget (a number in (0, 1e100]).")
    if values["pca_dim"] is not None and public_dataset is None and dataset != DIGITS:
        raise InputError(
            f"--pca-dim needs public data to fit the basis on: pass --public-dataset (only the built-in {DIGITS!r} "
            "has a public source half); the private target is never used for it."
        )
    return dataclass_from_options(PrivacyArguments, options, public_dataset=None)


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
