"""The training recipe behind `examples/train.py` and `surgical-peft train`: a run's settings to a saved adapter.

`add_training_arguments` adds the options, made from the fields of `ModelArguments`, `DataArguments`,
`FineTuneArguments`, `PrivacyArguments` and `HubArguments` (`surgical_peft.argparser`), to an `argparse` parser;
`run_arguments` turns the parsed options into `RunArguments`, once. `run_training` then holds the output directory
(an OS lock: a second run there is refused at once, naming the first one's process id), checks everything that can be
checked before training (that checkpoints in `--output-dir` are this run's, with the same settings and data, asked for
as many epochs or more: `surgical_peft.training.identity`; the blocks against the model; the labels by name), loads
the model and the target data (`surgical_peft.cli.target`), fine-tunes with `surgical_peft.training.fine_tune` under
Accelerate, and, on the main process only, saves the adapter with its model card and a `metrics.json` (every file
written to a temporary file, then renamed: `surgical_peft.files.write_file`), and pushes to the Hub if asked. A dry
run stops before training and says what would happen (`plan`), writing nothing.

Example:
    >>> import argparse
    >>> parser = add_training_arguments(argparse.ArgumentParser())
    >>> run = run_arguments(parser.parse_args(["--block", "stage1", "--train-n", "100", "--epochs", "3"]))
    >>> run.fine_tune.blocks, run.fine_tune.epochs, run.data.train_n, run.data.shift
    (['stage1'], 3, 100, 'contrast')
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..argparser import add_dataclass_arguments, dataclass_from_options
from ..errors import InputError, Interrupted
from ..files import locked_directory, write_file
from ..privacy.arguments import PrivacyArguments
from ..training.arguments import FineTuneArguments
from .arguments import DataArguments, HubArguments, ModelArguments, RunArguments
from .defaults import SOURCE_MODEL
from .hub import check_hub, push_saved  # hub (issue 23)
from .privacy import card_rows, check_private_run, privacy_arguments

if TYPE_CHECKING:  # the parser needs none of these: they are imported where they run (`--help` stays fast)
    from accelerate import PartialState

    from .target import Target

__all__ = ["add_training_arguments", "plan", "print_summary", "printed_run_lines", "run_arguments", "run_training"]

_RUN_FILE = "run_args.json"
# The sections of the help, in order (each option names its own, `surgical_peft.argparser`).
_SECTIONS = ("model and data", "fine-tuning", "schedules and self-training", PrivacyArguments._argument_group_name,
             "output")  # fmt: skip


def add_training_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the training options (model, data, shift, blocks, optimisation, privacy, output) and `--dry-run` to
    `parser` and return it.

    Example:
        >>> args = add_training_arguments(argparse.ArgumentParser()).parse_args(["--shift", "fog", "--severity", "3"])
        >>> args.shift, args.severity, args.dataset
        ('fog', 3, 'digits')
    """
    for title in _SECTIONS:
        parser.add_argument_group(title)
    for arguments in (ModelArguments, DataArguments, FineTuneArguments, PrivacyArguments, HubArguments):
        add_dataclass_arguments(parser, arguments)
    output = next(group for group in parser._action_groups if group.title == "output")
    output.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything and print the plan (labels, splits, image size, blocks, adapter size, where files "
        "go), then stop: nothing is trained or written",
    )
    return parser


def run_arguments(options: argparse.Namespace) -> RunArguments:
    """The run that options parsed by an `add_training_arguments` parser describe, as typed settings.

    Raises:
        InputError: for an invalid value (e.g. `--epochs 0`) or combination (e.g. `all` with other blocks, privacy
            options with a strategy that is not private).
    """
    data = dataclass_from_options(DataArguments, options)
    privacy = privacy_arguments(options, options.strategy, dataset=data.dataset, public_dataset=data.public_dataset)
    return RunArguments(
        model=dataclass_from_options(ModelArguments, options),
        data=data,
        fine_tune=dataclass_from_options(FineTuneArguments, options, privacy=privacy),
        hub=dataclass_from_options(HubArguments, options),
        dry_run=options.dry_run,
    )


def _check_blocks(model: Any, blocks: list[str]) -> None:
    from ..blocks import SPECIAL, list_blocks

    list_blocks(model).target_modules([block for block in blocks if block not in SPECIAL])


def _run_name(run: RunArguments) -> str:
    model, dataset, blocks = Path(run.model.model).name, Path(run.data.dataset).name, "+".join(run.fine_tune.blocks)
    return f"{model}-{dataset}-{run.data.shift}-{blocks}-seed{run.fine_tune.seed}"


def _check_resumable(output_dir: Path, run: RunArguments, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The run's settings (`RunArguments.identity`); an `InputError` if `output_dir` holds checkpoints of a run with
    other settings (or, given its fingerprint, other data), or of more epochs than asked for
    (`surgical_peft.training.identity.check_resumable`)."""
    from ..training.checkpoint import latest_checkpoint
    from ..training.identity import RunIdentity, check_resumable

    settings = run.identity()
    latest = latest_checkpoint(output_dir)
    if latest is not None:
        identity = RunIdentity(settings, data=dict(data) if data is not None else None)
        check_resumable(output_dir, latest[1], identity, run.fine_tune.phases())
    return settings


@dataclass
class _Run:
    """Everything `run_training` needs once the input is checked."""

    target: Target
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


def _output_dir(run: RunArguments) -> Path:
    output_dir = Path(run.fine_tune.output_dir or Path("outputs") / _run_name(run))
    existing = next(path for path in (output_dir, *output_dir.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise InputError(f"--output-dir {output_dir}: {existing} is a file, not a directory. Pass a directory.")
    if run.hub.push_to_hub:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(run.hub.hub_model_id or output_dir.name)
        except HFValidationError as error:
            raise InputError(f"--hub-model-id: {error}") from error
    return output_dir


@contextlib.contextmanager
def _locked(output_dir: Path, state: PartialState, dry_run: bool) -> Iterator[None]:
    """Hold `output_dir` for this run (`surgical_peft.files.locked_directory`, on the main process; every process
    learns whether another run holds it, and all refuse together). A dry run writes nothing and holds nothing."""
    with contextlib.ExitStack() as stack:
        refusal = None
        if state.is_main_process and not dry_run:
            try:
                stack.enter_context(locked_directory(output_dir, "training"))
            except InputError as error:
                refusal = str(error)
        if state.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise InputError(refusal)
        yield


def _prepare(run: RunArguments, state: PartialState, output_dir: Path) -> _Run:
    from .models import load_model
    from .target import load_target

    settings = _check_resumable(output_dir, run)
    if run.model.model == SOURCE_MODEL:  # its blocks, before it is pretrained
        _check_blocks(load_model(SOURCE_MODEL, pretrained=False).model, run.fine_tune.blocks)
    target = load_target(run, state=state)
    _check_resumable(output_dir, run, target.fingerprint)
    if state.is_main_process:
        print(target.describe(), flush=True)
    _check_blocks(target.model.model, run.fine_tune.blocks)
    args = replace(run.fine_tune, modules_to_save=target.model.modules_to_save, output_dir=str(output_dir))
    if args.privacy is not None:  # differential privacy: the public data, and checks against the data
        args = replace(args, privacy=replace(args.privacy, public_dataset=target.public))
        check_private_run(target.model.model, target.train.num_rows, args)
    if target.unlabeled is not None:
        args = replace(args, unlabeled_dataset=target.unlabeled)
    return _Run(target=target, args=args, output_dir=output_dir, settings=settings)


def run_training(options: argparse.Namespace | RunArguments) -> dict[str, Any]:
    """Check the input, fine-tune, save (main process) and optionally push; returns the run's summary. A dry run
    stops before training and returns its plan (`plan`).

    Args:
        options: options parsed by a parser that `add_training_arguments` set up, or the `RunArguments` they stand
            for.

    Returns:
        A dict with the settings, the model, the image size and its source, the label names, `metrics` (final
        `train_loss`, `eval_accuracy`), the per-epoch `history`, `num_processes`, `adapter_sha256` (a hash of the saved
        deltas, equal on every process) and `adapter_dir`, plus `commit_url` after a push. The same (without
        `commit_url`) is written to `<output_dir>/metrics.json`.

    Raises:
        InputError: for bad input, before any training.
        Interrupted: when training is interrupted (Ctrl-C); the message names the last complete checkpoint.

    Example (a minute or two on a CPU, including pretraining the default model once)::

        parser = add_training_arguments(argparse.ArgumentParser())
        summary = run_training(parser.parse_args(["--block", "stage1", "--epochs", "5"]))
        print(summary["metrics"]["eval_accuracy"])
    """
    from ..training.accelerator import check_mixed_precision

    run = options if isinstance(options, RunArguments) else run_arguments(options)
    state = _process_state()
    _quiet(state, run.fine_tune.progress)
    check_mixed_precision(run.fine_tune.mixed_precision, state.device)
    output_dir = _output_dir(run)
    if run.hub.push_to_hub:  # hub (issue 23): the Hub and a token that may write, before anything is loaded
        check_hub(run.hub.hub_model_id or output_dir.name)
    with _locked(output_dir, state, run.dry_run):
        prepared = _prepare(run, state, output_dir)
        if run.dry_run:
            return plan(prepared, run)
        summary = _train(prepared, run, state)
        state.wait_for_everyone()
        if run.hub.push_to_hub and state.is_main_process:  # hub: after the barrier, so a failed push holds no one
            repo_id = run.hub.hub_model_id or output_dir.name
            summary["commit_url"] = push_saved(summary["adapter_dir"], repo_id)  # (a failure says how to push later)
    return summary


def _train(prepared: _Run, run: RunArguments, state: PartialState) -> dict[str, Any]:
    """Fine-tune (each checkpoint records the run's settings and data) and save (main process); returns the run's
    summary."""
    from ..training import fine_tune

    target = prepared.target
    try:
        result = fine_tune(  # (run_settings: recorded in each checkpoint and logged to the trackers)
            target.model.model,
            target.train,
            target.eval,
            prepared.args,
            run_settings=prepared.settings,
            data_fingerprint=target.fingerprint,
        )
        summary = _summary(prepared, result, state)
        if state.is_main_process:
            _save(prepared, run, result, summary)
    except KeyboardInterrupt:
        raise Interrupted(_where_it_stopped(prepared)) from None
    return summary


def _where_it_stopped(prepared: _Run) -> str:
    """Where an interrupted run can resume from: its last complete checkpoint, if any."""
    from ..training.checkpoint import latest_checkpoint

    latest = latest_checkpoint(prepared.output_dir)
    if latest is None:
        return f"no checkpoint of {prepared.output_dir} was complete yet, so the run starts over."
    checkpoint, progress = latest
    done, total = progress.epochs_of(prepared.args.phases())
    return f"the last complete checkpoint is {checkpoint} (epoch {done} of {total})."


def _summary(prepared: _Run, result: Any, state: PartialState) -> dict[str, Any]:
    """What the run did: its settings and results, as `metrics.json` records them."""
    import safetensors.torch
    from peft import get_peft_model_state_dict

    deltas = get_peft_model_state_dict(result.model, save_embedding_layers=False)
    digest = hashlib.sha256(safetensors.torch.save(dict(sorted(deltas.items())))).hexdigest()
    if state.num_processes > 1:
        print(f"[process {state.process_index}/{state.num_processes}] adapter sha256 {digest}", flush=True)
    target = prepared.target
    return {
        **prepared.settings,
        "model": target.model.name_or_path,
        "blocks": result.model.peft_config[result.model.active_adapter].blocks,
        "strategy": prepared.args.strategy,
        "labels": list(target.labels.model_names),
        "image_size": target.image_size.pixels,
        "image_size_source": target.image_size.source,
        "metrics": result.metrics,
        "history": result.history,
        "num_processes": state.num_processes,
        "adapter_sha256": digest,
        "adapter_dir": str(prepared.output_dir / "adapter"),
        **({"privacy": result.privacy} if result.privacy is not None else {}),
    }


def _save(prepared: _Run, run: RunArguments, result: Any, summary: dict[str, Any]) -> None:
    """Save the adapter with its model card, the run's settings (`run_args.json`) and `metrics.json` (main process)."""
    from ..hub import render_model_card, save_adapter_with_card

    data, repo_id = run.data, run.hub.hub_model_id or prepared.output_dir.name
    recipe = {"strategy": summary["strategy"], "blocks": ", ".join(summary["blocks"])}
    recipe.update(lr=run.fine_tune.learning_rate, epochs=run.fine_tune.epochs, train_n=prepared.target.counts["train"])
    recipe.update(batch_size=run.fine_tune.batch_size, seed=run.fine_tune.seed, image_size=summary["image_size"])
    recipe.update(shift=data.shift, severity=data.severity or "-")
    recipe.update(card_rows(result.privacy) if result.privacy is not None else {})
    card = render_model_card(
        result.model,
        shift=None if data.shift == "none" else data.shift,  # no shift:none tag on your own data
        dataset=data.dataset,
        recipe=recipe,
        metrics=result.metrics,
        repo_id=repo_id if run.hub.push_to_hub else None,
        new_labels=prepared.target.labels.kind in ("renamed", "new-head"),
    )
    save_adapter_with_card(result.model, Path(summary["adapter_dir"]), card)
    write_file(prepared.output_dir / _RUN_FILE, json.dumps(prepared.settings, indent=1))
    write_file(prepared.output_dir / "metrics.json", json.dumps(summary, indent=1))


def plan(prepared: _Run, run: RunArguments) -> dict[str, Any]:
    """What the run would do, for `--dry-run`: the blocks it would tune with their parameter counts, the adapter's size
    (an adapter is made on the dry run's copy of the model, never trained), whether it would start, resume or find the
    run complete, and where everything would be written."""
    from ..blocks import ALL, AUTO, list_blocks
    from ..hub import describe_adapter_size
    from ..training.checkpoint import latest_checkpoint
    from ..training.loop import adapter_config
    from ..tuner import quiet_get_peft_model

    args, target = prepared.args, prepared.target
    block_map = list_blocks(target.model.model)
    blocks = [] if args.blocks == [AUTO] else args.adapter_blocks()
    blocks = list(block_map) if blocks == [ALL] else blocks
    size = describe_adapter_size(quiet_get_peft_model(target.model.model, adapter_config(args))) if blocks else None
    latest = latest_checkpoint(prepared.output_dir)
    done, total = latest[1].epochs_of(args.phases()) if latest else (0, sum(p.epochs for p in args.phases()))
    pretrained_into = None
    if run.model.model == SOURCE_MODEL and target.model.name_or_path == SOURCE_MODEL:  # not pretrained yet
        from ..experiments.demo import source_model_path

        pretrained_into = str(source_model_path(run.data.shift, seed=args.seed, cache_dir=run.model.cache_dir))
    return {
        "dry_run": True,
        "blocks": {block: block_map.num_parameters[block] for block in blocks},
        "new_head": target.model.modules_to_save,
        "adapter_size": size,
        "epochs_done": done,
        "epochs": total,
        "checkpoint": str(latest[0]) if latest else None,
        "output_dir": str(prepared.output_dir),
        "pretrained_into": pretrained_into,
        "hub_repo": (run.hub.hub_model_id or prepared.output_dir.name) if run.hub.push_to_hub else None,
    }


def _print_plan(plan: dict[str, Any]) -> None:
    from ..blocks import format_count

    blocks = ", ".join(f"{name} ({format_count(count)} parameters)" for name, count in plan["blocks"].items())
    print(f"Blocks to tune: {blocks or 'chosen by Auto-RGN on the training images when training starts'}")
    if plan["new_head"]:
        print(f"New head: {', '.join(plan['new_head'])}, trained and saved in full")
    if plan["adapter_size"] is not None:
        print(f"Adapter on disk: {plan['adapter_size']} (adapter_model.safetensors)")
    if plan["checkpoint"] is None:
        print(f"Training: {plan['epochs']} epochs from the start")
    elif plan["epochs_done"] < plan["epochs"]:
        print(f"Training: would resume from {plan['checkpoint']} (epoch {plan['epochs_done']} of {plan['epochs']})")
    else:
        print(f"Training: already complete ({plan['epochs']} epochs in {plan['checkpoint']}), nothing to train")
    output = Path(plan["output_dir"])
    print(f"Would write: {output / 'checkpoints'}/, {output / 'adapter'}/, {output / 'metrics.json'}, "
          f"{output / _RUN_FILE}")  # fmt: skip
    if plan["pretrained_into"]:
        print(f"Would pretrain the built-in {SOURCE_MODEL} and cache it in {plan['pretrained_into']}")
    if plan["hub_repo"]:
        print(f"Would push the adapter to the Hub repository {plan['hub_repo']}")
    print("Dry run: nothing was trained or written.")


@contextlib.contextmanager
def printed_run_lines() -> Iterator[None]:
    """The lines a run logs (one per epoch, where it resumes: `surgical_peft.training.fine_tune`, at INFO) printed on
    stdout while it runs, with or without progress bars.

    Example:
        >>> with printed_run_lines():
        ...     logging.getLogger("surgical_peft.training.loop").info("fine-tune epoch 1/1: train loss 0.1000")
        fine-tune epoch 1/1: train loss 0.1000
    """
    logger = logging.getLogger("surgical_peft")
    handler, level = logging.StreamHandler(sys.stdout), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def print_summary(summary: dict[str, Any]) -> None:
    """Print a run's final metrics, where its adapter is and, after a push, the Hub commit's URL; or a dry run's plan
    (on the main process only)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if summary.get("dry_run"):
        _print_plan(summary)
        return
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
