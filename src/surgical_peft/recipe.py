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
from typing import Any

from .config import DELTA_DTYPES
from .data import DIGITS, SHIFTS
from .training import LR_MODES, STRATEGIES, FineTuneArguments

__all__ = ["InputError", "add_training_arguments", "fine_tune_arguments", "load_classifier", "run_training"]

_ALL = "all"
_AUTO = "auto"
_DEFAULT_TRAIN_N = 200
_DEFAULTS = FineTuneArguments()
# Settings that may change between a run and its resumption; any other change makes a checkpoint unusable.
_RESUMABLE = ("epochs", "lp_epochs", "output_dir", "push_to_hub", "hub_model_id", "progress", "cache_dir")
_RUN_FILE = "run_args.json"


class InputError(ValueError):
    """Bad input found before training; the message names the problem and the valid choices."""


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options (model, data, shift, blocks, optimisation, output) to `parser` and return it.

    Example:
        >>> import argparse
        >>> args = add_training_arguments(argparse.ArgumentParser()).parse_args(["--shift", "fog", "--severity", "3"])
        >>> args.shift, args.severity, args.dataset
        ('fog', 3, 'digits')
    """
    data = parser.add_argument_group("model and data")
    data.add_argument(
        "--model",
        help="Hub id or local directory of an image classifier (default: the demo's small ResNet pretrained on the "
        "source half of the digits, cached under --cache-dir)",
    )
    data.add_argument(
        "--dataset", default=DIGITS, help="Hub dataset id, local imagefolder directory, or 'digits' (default)"
    )
    data.add_argument("--split", default="train", help="dataset split to use (default: %(default)s)")
    data.add_argument("--image-column", help="image column (default: the first datasets.Image column)")
    data.add_argument("--label-column", help="label column (default: the first ClassLabel column)")
    data.add_argument("--shift", choices=SHIFTS, default="contrast", help="target shift (default: %(default)s)")
    data.add_argument(
        "--severity", type=int, choices=range(1, 6), default=5, help="corruption severity (default: %(default)s)"
    )
    data.add_argument(
        "--train-n", type=int, default=_DEFAULT_TRAIN_N, help="labelled target training images (default: %(default)s)"
    )
    data.add_argument("--eval-n", type=int, help="target evaluation images (default: the rest of the target half)")
    data.add_argument(
        "--cache-dir", help="cache of the default model (default: $SURGICAL_PEFT_CACHE or ~/.cache/surgical_peft)"
    )

    train = parser.add_argument_group("fine-tuning")
    train.add_argument(
        "--block",
        action="append",
        dest="blocks",
        metavar="BLOCK",
        help=f"block to tune, repeatable; '{_ALL}' for full fine-tuning, '{_AUTO}' to pick one by Auto-RGN "
        f"(default: {' '.join(_DEFAULTS.blocks)})",
    )
    train.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default=_DEFAULTS.strategy,
        help="surgical: the blocks only; full; linear-probe: the head; lp-ft: the head, then the blocks and the head "
        "(default: %(default)s)",
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
        "--mixed-precision", choices=("no", "fp16", "bf16"), help="default: as configured for accelerate launch"
    )
    train.add_argument("--delta-dtype", choices=DELTA_DTYPES, help="dtype of the saved deltas (default: the weights')")
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="seed of data and training (default: 0)")
    train.add_argument(
        "--cache-features",
        action="store_true",
        help="compute the frozen blocks in front of the tuned ones once per image and reuse them every epoch "
        "(the input pipeline here is deterministic)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir",
        help="checkpoints, adapter/ and metrics.json; a rerun resumes from the last checkpoint "
        "(default: outputs/<model>-<dataset>-<shift>-<blocks>-seed<seed>)",
    )
    output.add_argument("--push-to-hub", action="store_true", help="upload the adapter with its model card")
    output.add_argument("--hub-model-id", help="Hub repository to push to (default: the output directory's name)")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    return parser


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
    blocks = args.blocks or list(_DEFAULTS.blocks)
    strategy = args.strategy
    if _ALL in blocks:
        if len(blocks) > 1 or strategy not in ("surgical", "full"):
            raise InputError(
                f"--block {_ALL} means full fine-tuning; it cannot be combined with other blocks ({blocks}) or "
                f"--strategy {strategy}."
            )
        strategy = "full"
    try:
        return FineTuneArguments(
            strategy=strategy,
            blocks=blocks,
            epochs=args.epochs,
            lp_epochs=args.lp_epochs,
            learning_rate=args.lr,
            lr_mode=args.lr_mode,
            weight_decay=args.weight_decay,
            batch_size=args.batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            delta_dtype=args.delta_dtype,
            mixed_precision=args.mixed_precision,
            seed=args.seed,
            output_dir=args.output_dir,
            progress=args.progress,
            cache_features=args.cache_features,
        )
    except ValueError as error:
        raise InputError(str(error)) from error


def load_classifier(model_name_or_path: str, label_names: list[str]) -> tuple[Any, list[str] | None]:
    """Load an image classifier for `label_names`; returns the model and the `modules_to_save` it needs.

    When the model has a different number of labels, its head is re-initialised for `label_names`
    (`ignore_mismatched_sizes=True`) and returned as `modules_to_save`: it is trained and saved in full.

    Raises:
        InputError: if the model cannot be loaded.

    Example:
        >>> import tempfile
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> path = tempfile.mkdtemp()
        >>> config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])  # 2 labels
        >>> ResNetForImageClassification(config).save_pretrained(path)
        >>> model, modules_to_save = load_classifier(path, ["cat", "dog", "bird"])
        >>> model.config.num_labels, modules_to_save
        (3, ['classifier'])
    """
    from transformers import AutoConfig, AutoModelForImageClassification

    from .blocks import list_blocks

    hint = "Pass a Hub id (cached when offline) or a local directory saved with save_pretrained."
    looks_local = Path(model_name_or_path).is_absolute() or model_name_or_path.startswith((".", "~"))
    if looks_local and not Path(model_name_or_path).expanduser().is_dir():
        raise InputError(f"Cannot load model {model_name_or_path!r}: there is no such directory. {hint}")
    try:
        config = AutoConfig.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot load model {model_name_or_path!r}: {error} {hint}") from error
    if config.num_labels == len(label_names):
        return AutoModelForImageClassification.from_pretrained(model_name_or_path), None
    model = AutoModelForImageClassification.from_pretrained(
        model_name_or_path,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={name: index for index, name in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    return model, list(list_blocks(model).get("head", ()))


def _check_blocks(model: Any, blocks: list[str]) -> None:
    from .blocks import list_blocks

    named = [block for block in blocks if block not in (_ALL, _AUTO)]
    try:
        list_blocks(model).target_modules(named)
    except ValueError as error:
        raise InputError(str(error)) from error


def _run_name(args: argparse.Namespace, blocks: list[str]) -> str:
    model = Path(args.model).name if args.model else "digits-resnet"
    return f"{model}-{Path(args.dataset).name}-{args.shift}-{'+'.join(blocks)}-seed{args.seed}"


def _check_resumable(output_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings; an `InputError` if `output_dir` holds checkpoints of a run with other settings."""
    settings = {key: value for key, value in sorted(vars(args).items()) if key not in _RESUMABLE}
    recorded = output_dir / _RUN_FILE
    if recorded.is_file() and (output_dir / "checkpoints").is_dir():
        previous = json.loads(recorded.read_text())
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

    model: Any
    model_name: str
    train: Any
    eval: Any
    args: FineTuneArguments
    output_dir: Path
    settings: dict[str, Any]


def _process_state() -> Any:
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


def _quiet(state: Any, progress: bool) -> None:
    """Progress bars of `datasets` and `transformers` on the main process only (and not at all without progress)."""
    import datasets
    import transformers

    if not (progress and state.is_main_process):
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()


def _prepare(args: argparse.Namespace, state: Any) -> _Run:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from . import demo
    from .data import load_image_dataset, load_image_processor, make_target, preprocess

    _quiet(state, args.progress)
    fine_tune_args = fine_tune_arguments(args)
    output_dir = Path(args.output_dir or Path("outputs") / _run_name(args, fine_tune_args.blocks))
    if args.push_to_hub:
        try:
            validate_repo_id(args.hub_model_id or output_dir.name)
        except HFValidationError as error:
            raise InputError(f"--hub-model-id: {error}") from error
    settings = _check_resumable(output_dir, args)
    try:
        dataset = load_image_dataset(
            args.dataset, split=args.split, image_column=args.image_column, label_column=args.label_column
        )
        splits = make_target(
            dataset, args.shift, train_n=args.train_n, eval_n=args.eval_n, severity=args.severity, seed=args.seed
        )
    except ValueError as error:
        raise InputError(str(error)) from error
    model_name = args.model
    if model_name is None:  # the demo's source model: check the blocks before pretraining it
        from transformers import ResNetForImageClassification

        _check_blocks(ResNetForImageClassification(demo.source_config()), fine_tune_args.blocks)
        with state.main_process_first():
            model_name = str(demo.source_model(args.shift, seed=args.seed, cache_dir=args.cache_dir))
    model, modules_to_save = load_classifier(model_name, dataset.features["label"].names)
    _check_blocks(model, fine_tune_args.blocks)
    if modules_to_save and fine_tune_args.adapter_blocks() == ["head"]:
        raise InputError(
            f"The model's head was re-initialised for the dataset's {len(dataset.features['label'].names)} labels, "
            "so it is saved in full (modules_to_save), and an adapter of the head alone is not supported yet. Tune "
            "another block as well (e.g. --strategy lp-ft --block stage4)."
        )
    processor = load_image_processor(model_name)
    image_size = getattr(model.config, "image_size", None) or 224
    return _Run(
        model=model,
        model_name=model_name,
        train=preprocess(splits["train"], processor, image_size=image_size),
        eval=preprocess(splits["eval"], processor, image_size=image_size),
        args=replace(fine_tune_args, modules_to_save=modules_to_save, output_dir=str(output_dir)),
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

    from .hub import push_adapter, render_model_card, save_adapter_with_card
    from .shifts import CORRUPTIONS
    from .training import fine_tune

    state = _process_state()
    run = _prepare(args, state)
    if state.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        (run.output_dir / _RUN_FILE).write_text(json.dumps(run.settings, indent=1))
    result = fine_tune(run.model, run.train, run.eval, run.args)

    deltas = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    digest = hashlib.sha256(safetensors.torch.save(dict(sorted(deltas.items())))).hexdigest()
    if state.num_processes > 1:
        print(f"[process {state.process_index}/{state.num_processes}] adapter sha256 {digest}", flush=True)
    adapter_dir = run.output_dir / "adapter"
    summary = {
        **run.settings,
        "model": run.model_name,
        "blocks": result.model.peft_config[result.model.active_adapter].blocks,
        "strategy": run.args.strategy,
        "metrics": result.metrics,
        "history": result.history,
        "num_processes": state.num_processes,
        "adapter_sha256": digest,
        "adapter_dir": str(adapter_dir),
    }
    if state.is_main_process:
        repo_id = args.hub_model_id or run.output_dir.name
        recipe = {"strategy": summary["strategy"], "blocks": ", ".join(summary["blocks"])}
        recipe.update({key: getattr(args, key) for key in ("lr", "epochs", "train_n", "batch_size", "seed")})
        recipe.update(shift=args.shift, severity=args.severity if args.shift in CORRUPTIONS else "-")
        card = render_model_card(
            result.model,
            shift=args.shift,
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
