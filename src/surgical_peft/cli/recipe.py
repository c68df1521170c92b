"""The training recipe behind `examples/train.py` and `surgical-peft train`: command-line arguments to a saved adapter.

`add_training_arguments` adds the options to an `argparse` parser; `run_training` checks everything that can be
checked before training (the dataset's columns, the shift and its severity, `--train-n` against the data, the block
names against the model, a resumable `--output-dir`), raising `InputError` with a message naming the problem and the
valid choices, then loads the model (re-initialising the classification head when the number of labels differs),
fine-tunes it with `surgical_peft.training.fine_tune` under Accelerate, and, on the main process only, saves the
adapter with its model card and a `metrics.json`, and pushes to the Hub if asked.

Example:
    >>> import argparse
    >>> parser = add_training_arguments(argparse.ArgumentParser())
    >>> args = parser.parse_args(["--block", "stage1", "--train-n", "100", "--epochs", "3"])
    >>> fine_tune_arguments(args).blocks, fine_tune_arguments(args).epochs
    (['stage1'], 3)
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..training.strategies import STRATEGIES
from .defaults import DELTA_DTYPES, DIGITS, LR_MODES, MIXED_PRECISION, SOURCE_MODEL, TRAINING
from .options import MODEL_HELP, add_cache_dir_option, add_dataset_options, add_target_options, whole_number
from .privacy import (
    add_privacy_arguments,
    card_rows,
    check_private_run,
    needs_source_half,
    privacy_arguments,
    public_dataset,
)

if TYPE_CHECKING:  # the parser needs none of these: they are imported where they run (`--help` stays fast)
    from accelerate import PartialState

    from ..training import FineTuneArguments
    from .models import LoadedModel

__all__ = ["add_training_arguments", "fine_tune_arguments", "print_summary", "run_training", "training_option_names"]

_DEFAULT_TRAIN_N = 200
_DEFAULTS = TRAINING
# Settings that may change between a run and its resumption; any other change makes a checkpoint unusable.
_RESUMABLE = ("epochs", "lp_epochs", "output_dir", "push_to_hub", "hub_model_id", "progress", "cache_dir")
_RUN_FILE = "run_args.json"


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", help=f"{MODEL_HELP} (default: {SOURCE_MODEL}, pretrained on the source half)")
    data.add_argument(
        "--dataset",
        default=DIGITS,
        help="Hub dataset id, local imagefolder directory, or 'digits' (default); with your own model or dataset, "
        "all of it is the target",
    )
    add_dataset_options(data)
    add_target_options(data, train_n=_DEFAULT_TRAIN_N, shift=None, severity=None)
    data.add_argument(
        "--eval-n", type=whole_number(1), help="target evaluation images (default: the rest of the target)"
    )
    add_cache_dir_option(data)


def _add_fine_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    train = parser.add_argument_group("fine-tuning")
    train.add_argument(
        "--block",
        action="append",
        dest="blocks",
        metavar="BLOCK",
        help=f"block to tune, repeatable; 'all' for full fine-tuning, 'auto' to pick one by Auto-RGN "
        f"(default: {' '.join(_DEFAULTS.blocks)})",
    )
    strategies = "; ".join(f"{name}: {STRATEGIES.literal(name, 'description')}" for name in STRATEGIES.names)
    train.add_argument(
        "--strategy", choices=STRATEGIES.names, default=_DEFAULTS.strategy, help=f"{strategies} (default: %(default)s)"
    )
    train.add_argument("--epochs", type=int, default=_DEFAULTS.epochs, help="epochs (default: %(default)s)")
    train.add_argument("--lp-epochs", type=int, help="linear-probe epochs of lp-ft (default: --epochs)")
    train.add_argument(
        "--lr", type=float, default=_DEFAULTS.learning_rate, help="AdamW learning rate (default: %(default)s)"
    )
    train.add_argument(
        "--lr-mode",
        choices=LR_MODES,
        default=_DEFAULTS.lr_mode,
        help="rgn: scale each tensor's learning rate by its relative gradient norm (default: %(default)s)",
    )
    train.add_argument(
        "--lr-decay",
        type=float,
        default=_DEFAULTS.lr_decay,
        help="discriminative learning rates: a block DEPTH blocks below the head trains at lr * F**DEPTH, F in (0, 1] "
        "(default: %(default)s, no decay)",
        metavar="F",
    )
    train.add_argument(
        "--weight-decay", type=float, default=_DEFAULTS.weight_decay, help="AdamW weight decay (default: %(default)s)"
    )
    train.add_argument(
        "--batch-size", type=int, default=_DEFAULTS.batch_size, help="per-device batch size (default: %(default)s)"
    )
    train.add_argument(
        "--gradient-accumulation-steps",
        type=int,
        default=_DEFAULTS.gradient_accumulation_steps,
        help="batches per optimizer step (default: %(default)s)",
    )
    train.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISION,
        help="fp16 needs a GPU (default: as configured for accelerate launch)",
    )
    train.add_argument("--delta-dtype", choices=DELTA_DTYPES, help="dtype of the saved deltas (default: the weights')")
    train.add_argument(
        "--cache-features",
        action="store_true",
        help="compute the frozen blocks in front of the tuned ones once per image and reuse them every epoch "
        "(the input pipeline here is deterministic)",
    )


def _add_schedule_arguments(parser: argparse.ArgumentParser) -> None:
    schedule = parser.add_argument_group("schedules and self-training")
    schedule.add_argument(
        "--switch-every",
        type=int,
        metavar="K",
        help="alternate: switch block every K optimizer steps (default: every epoch)",
    )
    schedule.add_argument(
        "--unlabeled-n",
        type=int,
        default=0,
        metavar="N",
        help="self-train: unlabelled target images, cut from the target data after the labelled split (their labels "
        "only score the pseudo-labels)",
    )
    schedule.add_argument(
        "--pseudo-label-threshold",
        type=float,
        default=_DEFAULTS.pseudo_label_threshold,
        metavar="H",
        help="self-train: keep a pseudo-label when the ensemble's entropy over log(classes) is at most H, in [0, 1]",
    )
    schedule.add_argument(
        "--self-train-rounds", type=int, default=_DEFAULTS.self_train_rounds, help="self-train: teacher-student rounds"
    )
    schedule.add_argument(
        "--ensemble-size",
        type=int,
        default=_DEFAULTS.ensemble_size,
        help="self-train: adapters (seeds apart) whose mean prediction measures the uncertainty; the first labels",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir",
        help="checkpoints, adapter/ and metrics.json; a rerun resumes from the last checkpoint "
        "(default: outputs/<model>-<dataset>-<shift>-<blocks>-seed<seed>)",
    )
    output.add_argument("--push-to-hub", action="store_true", help="upload the adapter with its model card")
    output.add_argument("--hub-model-id", help="Hub repository to push to (default: the output directory's name)")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options (model, data, shift, blocks, optimisation, output) to `parser` and return it.

    Example:
        >>> import argparse
        >>> args = add_training_arguments(argparse.ArgumentParser()).parse_args(["--shift", "fog", "--severity", "3"])
        >>> args.shift, args.severity, args.dataset
        ('fog', 3, 'digits')
    """
    _add_data_arguments(parser)
    _add_fine_tuning_arguments(parser)
    _add_schedule_arguments(parser)
    add_privacy_arguments(parser)
    _add_output_arguments(parser)
    return parser


def training_option_names() -> set[str]:
    """The names (`argparse` dests) of the options `add_training_arguments` adds: what a run's settings are made of,
    whatever else the caller's parser holds (e.g. the command line's subcommand)."""
    parser = add_training_arguments(argparse.ArgumentParser(add_help=False))
    return {action.dest for action in parser._actions}


def fine_tune_arguments(args: argparse.Namespace) -> FineTuneArguments:
    """The `FineTuneArguments` that parsed options describe; `--block all` means full fine-tuning.

    Raises:
        InputError: for an invalid combination (e.g. `all` with other blocks) or value (e.g. `--epochs 0`).

    Example:
        >>> import argparse
        >>> args = add_training_arguments(argparse.ArgumentParser()).parse_args(["--block", "all"])
        >>> fine_tune_arguments(args).strategy
        'full'
    """
    from ..training import FineTuneArguments

    return FineTuneArguments(
        strategy=args.strategy,
        blocks=args.blocks or list(_DEFAULTS.blocks),
        epochs=args.epochs,
        lp_epochs=args.lp_epochs,
        learning_rate=args.lr,
        lr_mode=args.lr_mode,
        lr_decay=args.lr_decay,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        delta_dtype=args.delta_dtype,
        mixed_precision=args.mixed_precision,
        seed=args.seed,
        output_dir=args.output_dir,
        progress=args.progress,
        cache_features=args.cache_features,
        privacy=privacy_arguments(args),
        switch_every=args.switch_every,
        pseudo_label_threshold=args.pseudo_label_threshold,
        self_train_rounds=args.self_train_rounds,
        ensemble_size=args.ensemble_size,
    )


def _check_unlabeled_n(args: argparse.Namespace) -> None:
    """`--unlabeled-n` goes with `--strategy self-train`, and self-training needs it."""
    if args.strategy == "self-train" and args.unlabeled_n == 0:
        raise InputError("--strategy self-train needs unlabelled target images: --unlabeled-n N, N at least 1.")
    if args.strategy != "self-train" and args.unlabeled_n != 0:
        raise InputError(
            f"--unlabeled-n {args.unlabeled_n} applies to --strategy self-train only, not {args.strategy!r}."
        )


def _check_blocks(model: Any, blocks: list[str]) -> None:
    from ..blocks import SPECIAL, list_blocks

    list_blocks(model).target_modules([block for block in blocks if block not in SPECIAL])


def _run_name(args: argparse.Namespace, blocks: list[str]) -> str:
    model = Path(args.model).name if args.model else SOURCE_MODEL
    return f"{model}-{Path(args.dataset).name}-{args.shift}-{'+'.join(blocks)}-seed{args.seed}"


def _check_resumable(output_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings; an `InputError` if `output_dir` holds checkpoints of a run with other settings."""
    names = training_option_names() - set(_RESUMABLE) - ({"severity"} if args.severity is None else set())
    settings = {key: value for key, value in sorted(vars(args).items()) if key in names}
    recorded = output_dir / _RUN_FILE
    if recorded.is_file() and (output_dir / "checkpoints").is_dir():
        try:
            previous = json.loads(recorded.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(
                f"{recorded}, the settings of the run whose checkpoints are in {output_dir}, is damaged ({error}): "
                "pass another --output-dir, or delete that one to start over."
            ) from error
        changed = sorted(key for key in settings.keys() | previous.keys() if settings.get(key) != previous.get(key))
        if changed:
            raise InputError(
                f"{output_dir} holds checkpoints of a run with other settings ({', '.join(changed)} differ), which "
                "cannot be resumed. Pass another --output-dir, or delete that one to start over."
            )
    return settings


@dataclass
class _Run:
    """Everything `run_training` needs once the input is checked."""

    loaded: LoadedModel
    train: Any
    eval: Any
    args: FineTuneArguments
    output_dir: Path
    settings: dict[str, Any]


def _process_state() -> PartialState:
    """Accelerate's process state, set up before `fine_tune`'s `Accelerator` so that checks and pretraining can run
    on the main process first.

    Processes that `accelerate launch` or `torchrun` start on a machine without an accelerator form a CPU (gloo)
    group here even without `ACCELERATE_USE_CPU=1`; otherwise each of them would train alone and write the same files.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)


def _quiet(state: PartialState, progress: bool) -> None:
    """Progress bars of `datasets` and `transformers` on the main process only (and not at all without progress)."""
    import datasets
    import transformers

    if not (progress and state.is_main_process):
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _output_dir(args: argparse.Namespace, fine_tune_args: FineTuneArguments) -> Path:
    output_dir = Path(args.output_dir or Path("outputs") / _run_name(args, fine_tune_args.blocks))
    existing = next(path for path in (output_dir, *output_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise InputError(f"--output-dir {output_dir}: {existing} is a file, not a directory. Pass a directory.")
    if args.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(args.hub_model_id or output_dir.name)
        except HFValidationError as error:
            raise InputError(f"--hub-model-id: {error}") from error
    return output_dir


def _load_checked_model(
    args: argparse.Namespace, label_names: list[str], blocks: list[str], state: Any
) -> LoadedModel:
    """The model, its blocks checked first (for the built-in model, before pretraining it)."""
    from .models import load_model

    if args.model is None:
        _check_blocks(load_model(SOURCE_MODEL, pretrained=False).model, blocks)
    loaded = load_model(
        args.model or SOURCE_MODEL,
        label_names=label_names,
        shift=args.shift,
        seed=args.seed,
        cache_dir=args.cache_dir,
        state=state,
        progress=args.progress and state.is_main_process,
    )
    _check_blocks(loaded.model, blocks)
    return loaded


def _prepare(args: argparse.Namespace, state: PartialState) -> _Run:
    from ..blocks import HEAD
    from ..training.accelerator import check_mixed_precision
    from .target import load_target, resolve_shift

    _quiet(state, args.progress)
    resolve_shift(args)
    fine_tune_args = fine_tune_arguments(args)
    _check_unlabeled_n(args)
    check_mixed_precision(fine_tune_args.mixed_precision, state.device)
    output_dir = _output_dir(args, fine_tune_args)
    settings = _check_resumable(output_dir, args)
    target = load_target(args, eval_n=args.eval_n, unlabeled_n=args.unlabeled_n, public_half=needs_source_half(args))
    if state.is_main_process:
        print(target.message, flush=True)
    loaded = _load_checked_model(args, target.label_names, fine_tune_args.blocks, state)
    if loaded.modules_to_save and fine_tune_args.adapter_blocks() == [HEAD]:
        raise InputError(
            f"The model's head was re-initialised for the dataset's {len(target.label_names)} labels, so it is saved "
            "in full (modules_to_save), and an adapter of the head alone is not supported yet. Tune another block as "
            "well (e.g. --strategy lp-ft --block stage4)."
        )
    if fine_tune_args.privacy is not None:  # differential privacy: the public data, and checks against the data
        public = public_dataset(args, target.source, loaded.preprocess)
        fine_tune_args = replace(fine_tune_args, privacy=replace(fine_tune_args.privacy, public_dataset=public))
        check_private_run(loaded.model, target.train.num_rows, fine_tune_args)
    if target.unlabeled is not None:
        fine_tune_args = replace(fine_tune_args, unlabeled_dataset=loaded.preprocess(target.unlabeled))
    return _Run(
        loaded=loaded,
        train=loaded.preprocess(target.train),
        eval=loaded.preprocess(target.eval),
        args=replace(fine_tune_args, modules_to_save=loaded.modules_to_save, output_dir=str(output_dir)),
        output_dir=output_dir,
        settings=settings,
    )


def run_training(args: argparse.Namespace) -> dict[str, Any]:
    """Check the input, fine-tune, save (main process) and optionally push; returns the run's summary.

    Args:
        args: options parsed by a parser that `add_training_arguments` set up.

    Returns:
        A dict with the settings, `metrics` (final `train_loss`, `eval_accuracy`), the per-epoch `history`,
        `num_processes`, `adapter_sha256` (a hash of the saved deltas, equal on every process) and `adapter_dir`,
        plus `commit_url` after a push. The same (without `commit_url`) is written to `<output_dir>/metrics.json`.

    Raises:
        InputError: for bad input, before any training.

    Example (a minute or two on a CPU, including pretraining the default model once)::

        parser = add_training_arguments(argparse.ArgumentParser())
        summary = run_training(parser.parse_args(["--block", "stage1", "--epochs", "5"]))
        print(summary["metrics"]["eval_accuracy"])
    """
    import safetensors.torch
    from peft import get_peft_model_state_dict

    from ..hub import push_adapter, render_model_card, save_adapter_with_card
    from ..training import fine_tune

    state = _process_state()
    run = _prepare(args, state)
    if state.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / _RUN_FILE).write_text(json.dumps(run.settings, indent=1))
    result = fine_tune(run.loaded.model, run.train, run.eval, run.args)

    deltas = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    digest = hashlib.sha256(safetensors.torch.save(dict(sorted(deltas.items())))).hexdigest()
    if state.num_processes > 1:
        print(f"[process {state.process_index}/{state.num_processes}] adapter sha256 {digest}", flush=True)
    adapter_dir = run.output_dir / "adapter"
    summary = {
        **run.settings,
        "model": run.loaded.name_or_path,
        "blocks": result.model.peft_config[result.model.active_adapter].blocks,
        "strategy": run.args.strategy,
        "metrics": result.metrics,
        "history": result.history,
        "num_processes": state.num_processes,
        "adapter_sha256": digest,
        "adapter_dir": str(adapter_dir),
        **({"privacy": result.privacy} if result.privacy is not None else {}),
    }
    if state.is_main_process:
        repo_id = args.hub_model_id or run.output_dir.name
        recipe = {"strategy": summary["strategy"], "blocks": ", ".join(summary["blocks"])}
        recipe.update({key: getattr(args, key) for key in ("lr", "epochs", "train_n", "batch_size", "seed")})
        recipe.update(shift=args.shift, severity=args.severity or "-")
        recipe.update(card_rows(result.privacy) if result.privacy is not None else {})
        card = render_model_card(
            result.model,
            shift=None if args.shift == "none" else args.shift,  # no shift:none tag on your own data
            dataset=args.dataset,
            recipe=recipe,
            metrics=result.metrics,
            repo_id=repo_id if args.push_to_hub else None,
        )
        save_adapter_with_card(result.model, adapter_dir, card)
        (run.output_dir / "metrics.json").write_text(json.dumps(summary, indent=1))
        if args.push_to_hub:
            summary["commit_url"] = push_adapter(result.model, repo_id, card=card)
    state.wait_for_everyone()
    return summary


def print_summary(summary: dict[str, Any]) -> None:
    """Print a run's final metrics, where its adapter is and, after a push, the Hub commit's URL (on the main process
    only)."""
    from accelerate import PartialState

    if PartialState().is_main_process:
        metrics = ", ".join(f"{name} {value:.4f}" for name, value in summary["metrics"].items())
        for record in summary["history"]:
            if "pseudo_labels_kept" in record:  # self-training's rounds
                scored = record.get("pseudo_label_accuracy")
                accuracy = f", {100 * scored:.1f}% of them right" if scored is not None else ""
                kept = f"{record['pseudo_labels_kept']}/{record['unlabeled']}"
                print(f"{record['phase']}: kept {kept} pseudo-labels{accuracy}")
        print(f"{summary['strategy']} {'+'.join(summary['blocks'])}: {metrics}. Adapter: {summary['adapter_dir']}")
        if "commit_url" in summary:
            print(f"Pushed to the Hub: {summary['commit_url']}")
