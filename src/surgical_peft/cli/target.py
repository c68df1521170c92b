"""The command line's target data, for `train` and `rank` alike: which images train (or rank), which evaluate, and
what shift they get.

The built-in demo (the model `demo-resnet` on the dataset `digits`) is the paper's experiment: the digits are split
into a source half, which the model is pretrained on, and a target half, shifted by default (`DEFAULT_SHIFT` at
severity 5). With your own model or your own dataset, the whole dataset is the target and nothing is shifted unless
`--shift` asks. A source half is still cut off when something needs it, and the message says what: a shift that
defines both halves (`spurious`, `subpopulation`), or public data for `--pca-dim`.

Example:
    >>> import argparse
    >>> args = argparse.Namespace(model="./my-model", dataset="digits", shift=None, severity=None)
    >>> resolve_shift(args)
    >>> args.shift, args.severity
    ('none', None)
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import datasets

from ..errors import InputError
from ..experiments.data import DIGITS, SOURCE_SHIFTS, load_image_dataset, make_target
from ..experiments.demo import DEFAULT_SHIFT, SOURCE_MODEL
from ..experiments.shifts import CORRUPTIONS, SEVERITIES

__all__ = ["Target", "is_builtin_demo", "load_target", "resolve_shift"]


def is_builtin_demo(args: argparse.Namespace) -> bool:
    """Whether the run is the built-in demo: the model `demo-resnet` (the default of `train`) on `digits`."""
    return args.model in (None, SOURCE_MODEL) and args.dataset == DIGITS


def resolve_shift(args: argparse.Namespace) -> None:
    """Fill in `args.shift` and `args.severity` where the command line left them out (`None`): the demo's shift at
    severity 5 for the built-in demo, no shift otherwise; a severity only for a corruption.

    Raises:
        InputError: for `--severity` with a shift that is no corruption.
    """
    if args.shift is None:
        args.shift = DEFAULT_SHIFT if is_builtin_demo(args) else "none"
    if args.shift not in CORRUPTIONS:
        if args.severity is not None:
            raise InputError(
                f"--severity {args.severity} applies to a corruption ({', '.join(CORRUPTIONS)}), not to --shift "
                f"{args.shift}."
            )
        return
    args.severity = SEVERITIES[-1] if args.severity is None else args.severity


def _split_reason(args: argparse.Namespace, public_half: bool) -> str | None:
    """Why a source half is cut off the dataset (`None`: it is not, the whole dataset is the target)."""
    if args.shift in SOURCE_SHIFTS:
        return f"the {args.shift} shift defines a source and a target half"
    if is_builtin_demo(args):
        return f"{SOURCE_MODEL}, the built-in demo's model, is pretrained on the source half"
    if public_half:
        return "--pca-dim fits its basis on the source half, public data"
    return None


@dataclass
class Target:
    """The target data of a run: `train` (and `eval`, unless none was asked for), the `source` half when one was cut
    off (else `None`), the `unlabeled` images of self-training (else `None`), the dataset's label names, and a line
    saying how many images went where and why."""

    train: datasets.Dataset
    eval: datasets.Dataset | None
    source: datasets.Dataset | None
    unlabeled: datasets.Dataset | None
    label_names: list[str]
    message: str


def _describe(args: argparse.Namespace, total: int, splits: datasets.DatasetDict, reason: str | None, use: str) -> str:
    shift = "no shift" if args.shift == "none" else f"shift {args.shift}"
    shift += f" at severity {args.severity}" if args.severity is not None else ""
    counts = f"{splits['train'].num_rows} for {use}"
    counts += f", {splits['eval'].num_rows} for evaluation" if "eval" in splits else ""
    counts += f", {splits['unlabeled'].num_rows} unlabelled (self-training)" if "unlabeled" in splits else ""
    if reason is None:
        return f"Data: all {total} images of {args.dataset} are the target ({shift}): {counts}."
    source = splits["source"].num_rows
    return (
        f"Data: {total} images of {args.dataset}, split into a source half ({source}) and a target half "
        f"({total - source}) because {reason}; target {shift}: {counts}."
    )


def load_target(
    args: argparse.Namespace,
    *,
    eval_n: int | None = None,
    unlabeled_n: int = 0,
    public_half: bool = False,
    use: str = "training",
) -> Target:
    """Load `args.dataset` and cut its target data (see the module's docstring), after `resolve_shift`.

    Args:
        args: parsed `--model`, `--dataset`, `--shift`, `--severity`, `--train-n`, `--seed` and the dataset options
            of `surgical_peft.cli.options.add_dataset_options`.
        eval_n: images to evaluate on; default: the rest of the target; 0: none (`rank` only ranks).
        unlabeled_n: target images whose labels are set aside, for self-training (0: none).
        public_half: whether a source half is needed as public data (`--pca-dim` without `--public-dataset`).
        use: what the `train` split is for, in the message.

    Raises:
        InputError: for a dataset that cannot be loaded, a bad shift or severity, or too few images.
    """
    resolve_shift(args)
    dataset = load_image_dataset(
        args.dataset,
        split=args.split,
        image_column=args.image_column,
        label_column=args.label_column,
        skip_unreadable=args.skip_unreadable_images,
    )
    reason = _split_reason(args, public_half)
    try:
        splits = make_target(
            dataset,
            args.shift,
            train_n=args.train_n,
            eval_n=eval_n,
            unlabeled_n=unlabeled_n,
            severity=args.severity or SEVERITIES[-1],
            seed=args.seed,
            split_source=reason is not None,
        )
    except InputError as error:
        if reason is None:
            raise
        raise InputError(f"{error} The {dataset.num_rows} images were split into a source and a target half "
                         f"because {reason}.") from error  # fmt: skip
    return Target(
        train=splits["train"],
        eval=splits.get("eval"),
        source=splits.get("source"),
        unlabeled=splits.get("unlabeled"),
        label_names=dataset.features["label"].names,
        message=_describe(args, dataset.num_rows, splits, reason, use),
    )
