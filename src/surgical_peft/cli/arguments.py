"""The settings of a run of `surgical-peft train` (and `rank`, `demo`), as transformers' examples hold theirs:
`ModelArguments` and `DataArguments` beside the library's `FineTuneArguments` (privacy inside) and a `HubArguments`,
bundled in `RunArguments`. The options of the commands are made from their fields (`surgical_peft.argparser`): one
description of a run for the command line, `examples/train.py`, `--dry-run` and Python code.

`RunArguments.identity()` is the one place that says which settings define a run (a checkpoint resumes only under the
same); the others (`RESUMABLE`) may change between a run and its resumption.

Example:
    >>> run = RunArguments(model=ModelArguments(model="./my-model"), data=DataArguments(dataset="./my-images"))
    >>> run.data.shift, run.data.severity  # your own model and data: no shift unless asked
    ('none', None)
    >>> RunArguments().data.shift, RunArguments().data.severity  # the built-in demo
    ('contrast', 5)
    >>> run.identity()["lr"], run.identity()["dataset"], "epochs" in run.identity()  # more epochs resume a run
    (0.001, './my-images', False)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from ..argparser import option_values, whole_number
from ..errors import InputError
from ..training.arguments import RESUMABLE as FINE_TUNING_RESUMABLE
from ..training.arguments import FineTuneArguments
from .defaults import CORRUPTIONS, DEFAULT_SHIFT, DIGITS, SEVERITIES, SHIFTS, SOURCE_MODEL

__all__ = [
    "MODEL_HELP",
    "RESUMABLE",
    "DataArguments",
    "HubArguments",
    "ModelArguments",
    "RunArguments",
    "is_builtin_demo",
]

MODEL_HELP = (
    "a Hub model id (read from the local cache when offline), a local directory saved with save_pretrained, "
    f"or the built-in {SOURCE_MODEL} (the demo's small ResNet for 32x32 digits)"
)
MAX_IMAGE_SIZE = 8192  # pixels a side: larger overflows the resize
_DATA = "model and data"  # sections of the help
_OUTPUT = "output"

RESUMABLE = (*FINE_TUNING_RESUMABLE, "push_to_hub", "hub_model_id", "cache_dir")
"""The settings that may change between a run and its resumption (option names); every other one defines the run."""


@dataclass
class ModelArguments:
    """Which model to fine-tune.

    Args:
        model: a Hub id, a local directory saved with `save_pretrained`, or the built-in `demo-resnet` (pretrained on
            the source half of the digits, for the run's shift and seed).
        new_head: re-initialise the classification head for the dataset's classes (trained and saved in full), whatever
            the model's labels are; without it, a model whose labels are other names than the dataset's classes is
            refused (`surgical_peft.labels.match_labels`).
        cache_dir: where the built-in model is cached once pretrained.
    """

    _argument_group_name = _DATA

    model: str = field(
        default=SOURCE_MODEL,
        metadata={"help": f"{MODEL_HELP} (default: {SOURCE_MODEL}, pretrained on the source half)"},
    )
    new_head: bool = field(
        default=False,
        metadata={
            "help": "a new classification head for the dataset's classes, trained and saved in full (the model's own "
            "labels are dropped); needed when the model's labels are other names than the dataset's classes"
        },
    )
    cache_dir: str | None = field(
        default=None,
        metadata={
            "help": f"cache of the built-in {SOURCE_MODEL} (default: $SURGICAL_PEFT_CACHE or ~/.cache/surgical_peft)"
        },
    )


@dataclass
class DataArguments:
    """Which images train and evaluate, and how: the dataset, how it is read, the target's size and shift, and the
    image size.

    Args:
        dataset: a Hub dataset id, a local `imagefolder` directory, or `digits` (built in).
        split, image_column, label_column, skip_unreadable_images: how the dataset is read
            (`surgical_peft.experiments.data.load_image_dataset`).
        shift: the target's shift, one of `surgical_peft.experiments.data.SHIFTS`; `None`: the demo's shift for the
            built-in demo, none for your own model or data (`RunArguments` fills it in).
        severity: a corruption's severity, 1 to 5 (`None`: 5 for a corruption).
        train_n: labelled target images to train on (`None`: at most 200, leaving a fifth of the target, and at least
            one image per class, for evaluation).
        eval_n: target images to evaluate on (`None`: the rest).
        unlabeled_n: self-training's unlabelled target images, cut after the labelled ones.
        image_size: the side, in pixels, images are resized to (`None`: the model's image processor's, else its
            config's, else its timm config's, else the images' own, at most 224).
        public_dataset: public data (a Hub id or imagefolder) a private run fits its PCA basis on.
    """

    _argument_group_name = _DATA

    dataset: str = field(
        default=DIGITS,
        metadata={
            "help": "Hub dataset id, local imagefolder directory, or 'digits' (default); with your own model or "
            "dataset, all of it is the target"
        },
    )
    split: str = field(default="train", metadata={"help": "dataset split to use"})
    image_column: str | None = field(
        default=None, metadata={"help": "image column (default: the first datasets.Image column)"}
    )
    label_column: str | None = field(
        default=None, metadata={"help": "label column (default: the first ClassLabel column)"}
    )
    skip_unreadable_images: bool = field(
        default=False,
        metadata={"help": "leave out images that cannot be decoded (named in a warning) instead of stopping"},
    )
    shift: str | None = field(
        default=None,
        metadata={
            "help": f"target shift: {', '.join(SHIFTS)} (left out: {DEFAULT_SHIFT} for the built-in demo, none for "
            "your own model or data)",
            "choices": SHIFTS,
            "metavar": "SHIFT",
        },
    )
    severity: int | None = field(
        default=None,
        metadata={
            "help": f"corruption severity, 1-5 (left out: {SEVERITIES[-1]}; for a corruption only)",
            "choices": SEVERITIES,
        },
    )
    train_n: int | None = field(
        default=None,
        metadata={
            "help": "labelled target training images (default: at most 200, leaving a fifth of the target, and at "
            "least one image per class, for evaluation)",
            "type": whole_number(1),
        },
    )
    eval_n: int | None = field(
        default=None,
        metadata={"help": "target evaluation images (default: the rest of the target)", "type": whole_number(1)},
    )
    unlabeled_n: int = field(
        default=0,
        metadata={
            "help": "self-train: unlabelled target images, cut from the target data after the labelled split (their "
            "labels only score the pseudo-labels)",
            "metavar": "N",
            "group": "schedules and self-training",
        },
    )
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "image side in pixels (default: the model's image processor's, else its config's, else the "
            "images' own, at most 224)",
            "type": whole_number(1, MAX_IMAGE_SIZE),
        },
    )
    public_dataset: str | None = field(
        default=None,
        metadata={
            "help": "public dataset (Hub id or imagefolder) the PCA basis is fitted on (default for digits: its "
            "source half)",
            "group": "differential privacy (--strategy dp-linear-probe, dp-surgical)",
        },
    )

    def for_model(self, model: str) -> DataArguments:
        """These settings with the shift and severity filled in for `model`: the demo's shift at severity 5 for the
        built-in demo, no shift otherwise; a severity only for a corruption.

        Raises:
            InputError: for a severity with a shift that is no corruption.
        """
        shift = self.shift or (DEFAULT_SHIFT if is_builtin_demo(model, self.dataset) else "none")
        if shift not in CORRUPTIONS and self.severity is not None:
            raise InputError(
                f"--severity {self.severity} applies to a corruption ({', '.join(CORRUPTIONS)}), not to --shift "
                f"{shift}."
            )
        severity = (self.severity or SEVERITIES[-1]) if shift in CORRUPTIONS else None
        return replace(self, shift=shift, severity=severity)


@dataclass
class HubArguments:
    """Whether (and where) the adapter is pushed to the Hugging Face Hub once trained."""

    _argument_group_name = _OUTPUT

    push_to_hub: bool = field(default=False, metadata={"help": "upload the adapter with its model card"})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository to push to (default: the output directory's name)"}
    )


def is_builtin_demo(model: str, dataset: str) -> bool:
    """Whether a run is the built-in demo: the model `demo-resnet` on the dataset `digits`."""
    return model == SOURCE_MODEL and dataset == DIGITS


@dataclass
class RunArguments:
    """Everything one run of `surgical-peft train` is: the model, the data, how to fine-tune (with the privacy
    settings of a private strategy), the Hub; and whether it is a dry run (which checks and prints the plan, and
    writes nothing).

    The data's shift is filled in for the model (`DataArguments.for_model`), and what the settings of several parts
    say together is checked here (e.g. self-training's unlabelled images).

    Raises:
        InputError: for settings that do not go together.
    """

    model: ModelArguments = field(default_factory=ModelArguments)
    data: DataArguments = field(default_factory=DataArguments)
    fine_tune: FineTuneArguments = field(default_factory=FineTuneArguments)
    hub: HubArguments = field(default_factory=HubArguments)
    dry_run: bool = False

    def __post_init__(self) -> None:
        self.data = self.data.for_model(self.model.model)
        strategy, unlabeled = self.fine_tune.strategy, self.data.unlabeled_n
        if strategy == "self-train" and unlabeled == 0:
            raise InputError("--strategy self-train needs unlabelled target images: --unlabeled-n N, N at least 1.")
        if strategy != "self-train" and unlabeled != 0:
            raise InputError(f"--unlabeled-n {unlabeled} applies to --strategy self-train only, not {strategy!r}.")

    def identity(self) -> dict[str, Any]:
        """The settings that define the run, by option name, sorted: a checkpoint of this run resumes only under the
        same ones (everything but `RESUMABLE`; no severity where there is none)."""
        settings = self.fine_tune.identity()
        for part in (self.model, self.data, self.hub):
            settings.update(option_values(part))
        return {name: value for name, value in sorted(settings.items()) if name not in RESUMABLE and value is not None}
