"""`FineTuneArguments`: how to fine-tune (a field with a `help` is a command-line option too), and `FineTuneResult`.

Example:
    >>> from surgical_peft.training import FineTuneArguments
    >>> [(phase.name, phase.blocks) for phase in FineTuneArguments(strategy="lp-ft", blocks=["stage1"]).phases()]
    [('linear-probe', ['head']), ('fine-tune', ['stage1', 'head'])]
    >>> FineTuneArguments(blocks=["all"]).strategy  # every block: full fine-tuning
    'full'
    >>> FineTuneArguments(learning_rate=float("nan"))
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: learning_rate must be a finite number above 0, got nan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..argparser import option_values
from ..blocks import ALL, AUTO, HEAD
from ..errors import InputError
from .strategies import STRATEGIES
from .tracking import REPORT_TO, resolve_report_to

if TYPE_CHECKING:
    from peft import PeftModel

    from ..privacy import PrivacyArguments
    from .loop import Examples
    from .strategies._base import Phase

__all__ = ["DELTA_DTYPES", "LR_MODES", "MIXED_PRECISION", "RESUMABLE", "FineTuneArguments", "FineTuneResult"]

LR_MODES = ("constant", "rgn")
"""`constant`, or `rgn`: each tensor's learning rate scaled by its relative gradient norm, every epoch (Auto-RGN)."""

MIXED_PRECISION = ("no", "fp16", "bf16")
"""Accelerate's mixed precision modes."""

DELTA_DTYPES = ("float32", "bfloat16", "float16")  # a copy of tuner.config.DELTA_DTYPES, which imports PEFT
"""The dtypes the deltas may be saved in (`SurgicalConfig.delta_dtype`)."""

RESUMABLE = ("epochs", "lp_epochs", "output_dir", "progress", "report_to", "run_name")
"""The settings (option names) a rerun may change and still resume the run in `output_dir`: more epochs extend it,
and the trackers may change; every other option defines the run (`FineTuneArguments.identity`)."""

_SCHEDULES = "schedules and self-training"  # a section of the command line's help
_STRATEGIES_HELP = "; ".join(f"{name}: {STRATEGIES.literal(name, 'description')}" for name in STRATEGIES.names)

_MAX_SEED = 2**32 - 1  # numpy's bound, which Accelerate's `set_seed` seeds too


@dataclass
class FineTuneArguments:
    """How to fine-tune. A field with a `help` in its metadata is an option of `surgical-peft train` and
    `examples/train.py` too (`surgical_peft.argparser`).

    Args:
        strategy: one of `STRATEGIES.names` (`surgical_peft.training.strategies`).
        blocks: the blocks to tune for `surgical`, `lp-ft`, `alternate` (at least two, one per epoch in turn) and
            `gradual` (the blocks below the head, in forward order) (see `surgical_peft.list_blocks`); `["auto"]` picks
            the best block by Auto-RGN on the training data (`surgical_peft.select_blocks`); `["all"]` is full
            fine-tuning (`strategy="full"`).
        epochs: passes over the training set (for `lp-ft`, the fine-tuning phase).
        lp_epochs: epochs of the linear-probe phase of `lp-ft` (default: `epochs`).
        learning_rate: AdamW learning rate (for `lp-ft`, the fine-tuning phase; the probe uses 10x).
        lr_mode: `constant`, or `rgn` to scale each tensor's learning rate by its relative gradient norm
            (Auto-RGN, Lee et al. 2023), recomputed at the start of every epoch.
        lr_decay: discriminative learning rates (Howard & Ruder 2018), in (0, 1]: a block `depth` blocks below the
            model's top block (the head, depth 0) trains at `learning_rate * lr_decay**depth`; 1 (the default) gives
            every block the same rate. Not with `lr_mode="rgn"`.
        weight_decay: AdamW weight decay.
        batch_size: per-device batch size.
        gradient_accumulation_steps: optimizer step every this many batches.
        modules_to_save: modules trained and saved in full (a newly initialised head).
        delta_dtype: dtype of the saved deltas (`None`, "bfloat16", "float16").
        mixed_precision: "no", "fp16" or "bf16" for Accelerate; `None` takes it from `accelerate launch`/config.
            fp16 needs a GPU (`make_accelerator` refuses it on a CPU, where it would change nothing).
        seed: seeds data order and initialisation on every process (0 to 2**32 - 1).
        output_dir: where checkpoints (one per epoch, the latest kept) go; a rerun resumes from the latest.
        progress: show progress bars (main process only).
        cache_features: compute the frozen prefix in front of the first trained block once per example and reuse it
            in later epochs (`surgical_peft.features.FeatureCache`); only for deterministic input pipelines (no random
            augmentation), and ignored, with a warning, in a phase that trains the first block.
        cache_max_bytes: bound on the cached features' bytes (examples beyond it are computed every epoch).
        privacy: the budget (and NoisyGD settings) of `strategy="dp-linear-probe"` or `"dp-surgical"`
            (`surgical_peft.privacy`).
        switch_every: `alternate` switches block every this many optimizer steps; `None` (the default): every epoch.
        unlabeled_dataset: `self-train`'s unlabelled target images (`{"pixel_values"}` examples; a `labels` entry,
            when known, only scores the pseudo-labels and never reaches training).
        pseudo_label_threshold: `self-train` keeps a pseudo-label when the ensemble's predictive entropy, over
            log(classes), is at most this, in [0, 1] (0: only certain predictions; 1: every one).
        self_train_rounds: `self-train`'s teacher-student rounds (each round's students teach the next).
        ensemble_size: adapters, seeded apart on the one base, whose mean prediction measures `self-train`'s
            uncertainty; the first (the run's seed) is the teacher that labels.
        report_to: experiment trackers, as transformers names them: `"tensorboard"`, `"trackio"`, `"wandb"`,
            `"mlflow"`, a list of them, `"all"` (every installed one) or `"none"`; a list of trackers once checked
            (`surgical_peft.training.tracking`). Each needs its extra, e.g. `pip install 'surgical-peft[trackio]'`.
        run_name: the run's name in the trackers (default: the output directory's name).

    Example:
        >>> args = FineTuneArguments()
        >>> args.strategy, args.blocks, args.epochs, args.learning_rate, args.batch_size
        ('surgical', ['head'], 10, 0.001, 32)
        >>> FineTuneArguments(lr_decay=0.5, lr_mode="rgn")
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: lr_decay and lr_mode='rgn' both set per-tensor learning rates: choose one.
    """

    _argument_group_name = "fine-tuning"  # the options' section of the command line's help

    strategy: str = field(
        default="surgical",
        metadata={"help": _STRATEGIES_HELP, "choices": STRATEGIES.names},
    )
    blocks: list[str] = field(
        default_factory=lambda: [HEAD],
        metadata={
            "help": f"block to tune, repeatable; '{ALL}' for full fine-tuning, '{AUTO}' to pick one by Auto-RGN "
            f"(default: {HEAD})",
            "option": "--block",
            "action": "append",
            "metavar": "BLOCK",
        },
    )
    epochs: int = field(default=10, metadata={"help": "epochs"})
    lp_epochs: int | None = field(default=None, metadata={"help": "linear-probe epochs of lp-ft (default: --epochs)"})
    learning_rate: float = field(
        default=1e-3, metadata={"help": "AdamW learning rate", "option": "--lr", "aliases": ["--learning-rate"]}
    )
    lr_mode: str = field(
        default="constant",
        metadata={
            "help": "rgn: scale each tensor's learning rate by its relative gradient norm",
            "choices": LR_MODES,
        },
    )
    lr_decay: float = field(
        default=1.0,
        metadata={
            "help": "discriminative learning rates: a block DEPTH blocks below the head trains at lr * F**DEPTH, F in "
            "(0, 1] (1: no decay)",
            "metavar": "F",
        },
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    batch_size: int = field(default=32, metadata={"help": "per-device batch size"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "batches per optimizer step"})
    modules_to_save: list[str] | None = None
    delta_dtype: str | None = field(
        default=None,
        metadata={"help": "dtype of the saved deltas (default: the weights')", "choices": DELTA_DTYPES},
    )
    mixed_precision: str | None = field(
        default=None,
        metadata={
            "help": "fp16 needs a GPU (default: as configured for accelerate launch)",
            "choices": MIXED_PRECISION,
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the data splits, the shift and the training"})
    output_dir: str | None = field(
        default=None,
        metadata={
            "help": "checkpoints, adapter/ and metrics.json; a rerun resumes from the last checkpoint "
            "(default: outputs/<model>-<dataset>-<shift>-<blocks>-seed<seed>)",
            "group": "output",
        },
    )
    progress: bool = field(default=True, metadata={"help": "hide progress bars", "group": "output"})
    cache_features: bool = field(
        default=False,
        metadata={
            "help": "compute the frozen blocks in front of the tuned ones once per image and reuse them every epoch "
            "(the input pipeline here is deterministic)"
        },
    )
    cache_max_bytes: int = 4 * 2**30
    privacy: PrivacyArguments | None = None
    switch_every: int | None = field(
        default=None,
        metadata={
            "help": "alternate: switch block every K optimizer steps (default: every epoch)",
            "metavar": "K",
            "group": _SCHEDULES,
        },
    )
    unlabeled_dataset: Examples | None = field(default=None, repr=False)
    pseudo_label_threshold: float = field(
        default=0.2,
        metadata={
            "help": "self-train: keep a pseudo-label when the ensemble's entropy over log(classes) is at most H, in "
            "[0, 1]",
            "metavar": "H",
            "group": _SCHEDULES,
        },
    )
    self_train_rounds: int = field(
        default=1, metadata={"help": "self-train: teacher-student rounds", "group": _SCHEDULES}
    )
    ensemble_size: int = field(
        default=3,
        metadata={
            "help": "self-train: adapters (seeds apart) whose mean prediction measures the uncertainty; the first "
            "labels",
            "group": _SCHEDULES,
        },
    )
    report_to: str | list[str] = field(
        default="none",
        metadata={
            "help": f"experiment trackers: {', '.join(REPORT_TO)}; each is an extra, e.g. "
            "pip install 'surgical-peft[tensorboard]'",
            "nargs": "+",
            "metavar": "TRACKER",
            "group": "output",
        },
    )
    run_name: str | None = field(
        default=None,
        metadata={"help": "the run's name in the trackers (default: the output directory's name)", "group": "output"},
    )

    def __post_init__(self) -> None:
        STRATEGIES.check(self.strategy)
        self.report_to = resolve_report_to(self.report_to)
        if self.lr_mode not in LR_MODES:
            raise InputError(f"Unknown lr_mode {self.lr_mode!r}. Valid: {', '.join(LR_MODES)}.")
        meaning = {ALL: "means full fine-tuning", AUTO: "picks the block from the training data"}
        for special, what in meaning.items():
            if special in self.blocks and len(self.blocks) > 1:
                raise InputError(
                    f"blocks=[{special!r}] {what}; it cannot be combined with other blocks: {self.blocks}"
                )
        if self.blocks == [ALL]:
            if self.strategy not in ("surgical", "full"):
                raise InputError(f"blocks=['all'] {meaning[ALL]}; it cannot go with strategy={self.strategy!r}.")
            self.strategy = "full"
        if not self.blocks and STRATEGIES.get(self.strategy).uses_blocks:
            raise InputError(f"strategy={self.strategy!r} needs at least one block to tune.")
        self._check_numbers()
        if self.lr_decay != 1 and self.lr_mode == "rgn":
            raise InputError("lr_decay and lr_mode='rgn' both set per-tensor learning rates: choose one.")
        if self.switch_every is not None and self.strategy != "alternate":
            raise InputError(
                f"switch_every={self.switch_every} switches the blocks of strategy='alternate'; it does not apply to "
                f"strategy={self.strategy!r}."
            )
        self.phases()  # a strategy checks what it needs (e.g. alternate: several blocks)

    def _check_numbers(self) -> None:
        """Refuse numeric settings outside their range (a NaN is outside every range)."""
        for name in ("epochs", "batch_size", "gradient_accumulation_steps", "lp_epochs", "switch_every"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, got {value}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"learning_rate must be a finite number above 0, got {self.learning_rate}.")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InputError(f"weight_decay must be a finite number of at least 0, got {self.weight_decay}.")
        if not 0 <= self.seed <= _MAX_SEED:
            raise InputError(f"seed must be between 0 and {_MAX_SEED}, got {self.seed}.")
        if not 0 < self.lr_decay <= 1:  # (a NaN fails this too)
            raise InputError(f"lr_decay must be in (0, 1] (1: no decay), got {self.lr_decay}.")
        if not 0 <= self.pseudo_label_threshold <= 1:
            raise InputError(
                "pseudo_label_threshold is a normalised entropy and must be in [0, 1] (0: keep only certain "
                f"predictions, 1: keep every one), got {self.pseudo_label_threshold}."
            )
        for name in ("self_train_rounds", "ensemble_size"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.cache_max_bytes < 0:
            raise InputError(f"cache_max_bytes must be at least 0, got {self.cache_max_bytes}.")
        if self.delta_dtype is not None and self.delta_dtype not in DELTA_DTYPES:
            raise InputError(f"Unknown delta_dtype {self.delta_dtype!r}. Valid: {', '.join(DELTA_DTYPES)} (or None).")
        if self.mixed_precision is not None and self.mixed_precision not in MIXED_PRECISION:
            raise InputError(
                f"Unknown mixed_precision {self.mixed_precision!r}. Valid: {', '.join(MIXED_PRECISION)} (or None)."
            )

    def identity(self) -> dict[str, Any]:
        """The settings that define a run of these arguments, by option name, with the privacy settings: every option
        but `RESUMABLE` and those left `None`. Each checkpoint records them, and a rerun resumes only under the same.

        Example:
            >>> identity = FineTuneArguments(blocks=["stage1"], epochs=3).identity()
            >>> identity["block"], identity["lr"], "epochs" in identity
            (['stage1'], 0.001, False)
        """
        settings = option_values(self)
        settings.update(option_values(self.privacy) if self.privacy is not None else {})
        return {name: value for name, value in sorted(settings.items()) if name not in RESUMABLE and value is not None}

    def phases(self) -> list[Phase]:
        """The phases of the strategy, in order."""
        return STRATEGIES.get(self.strategy).phases(self)

    def adapter_blocks(self) -> list[str]:
        """The blocks the adapter holds: the union over phases."""
        blocks: list[str] = []
        for phase in self.phases():
            blocks += [block for block in phase.blocks if block not in blocks]
        return blocks


@dataclass
class FineTuneResult:
    """What `fine_tune` returns: the tuned `PeftModel`, the final metrics, per-epoch history and, for a private
    strategy, the privacy spent.

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft.training import fine_tune
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
        >>> args = FineTuneArguments(strategy="lp-ft", blocks=["stage1"], epochs=1, batch_size=4, progress=False)
        >>> result = fine_tune(model, data, args=args)
        >>> type(result.model).__name__, [(row["phase"], row["epoch"]) for row in result.history], result.privacy
        ('PeftModel', [('linear-probe', 1), ('fine-tune', 1)], None)
    """

    model: PeftModel
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    privacy: dict[str, Any] | None = None  # a private strategy's record: spent epsilon, delta, accountant, ...
