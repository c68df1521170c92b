"""`fine_tune`: the training loop, on Accelerate, one phase after another as the strategy says.

Each phase (see `surgical_peft.training.strategies`) gets its own DDP wrapper (consecutive phases at one learning
rate share one optimizer over every tensor of the adapter, so a block's AdamW state carries on across them), runs its
epochs (`epoch.train_epoch`; a phase with `switch_every` switches its trained block within them), evaluates after each
one and checkpoints it (`checkpoint`); a rerun with the same `output_dir` resumes from the latest checkpoint. Only the
main process shows progress bars and writes files.

A resumed run is bit-identical to the uninterrupted one: the checkpoint holds the model, optimizer and RNG states;
the data order of an epoch depends only on the seed, the phase and the epoch (`epoch_seed`), not on what ran in this
process before it; and a feature cache is refilled as the epochs before the checkpoint filled it (the frozen prefix
gives other bits for one example alone than in a batch, so the batches it ran on matter). A rerun resumes only the
same run (`identity`: the same settings, data and Accelerate settings, for as many epochs or more).

A tuned BatchNorm layer normalises each channel over the batch, which a batch of one image cannot give where the
feature map is 1x1: where one trains, a last batch of one is left out of every epoch (and the run says so), and a
training set or batch size that gives only batches of one is refused.

Example:
    >>> import torch
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft.training import FineTuneArguments, fine_tune
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
    ...                                                  num_labels=2))
    >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
    >>> result = fine_tune(base, data, data, FineTuneArguments(blocks=["stage1"], epochs=1, batch_size=4,
    ...                                                         progress=False))
    >>> sorted(result.metrics)
    ['eval_accuracy', 'train_loss']
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import PeftModel
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.data import DataLoader, Dataset

from ..blocks import ALL, AUTO, BlockMap, list_blocks, unwrap_model
from ..errors import InputError
from ..features import FeatureCache, IndexedDataset
from ..labels import check_label_names
from ..selection import select_blocks
from ..tuner import SurgicalConfig, SurgicalModel, quiet_get_peft_model
from .accelerator import make_accelerator, set_unused_parameter_search
from .arguments import FineTuneArguments, FineTuneResult
from .checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint
from .epoch import train_epoch
from .evaluation import evaluate_accuracy
from .identity import RunIdentity, accelerate_settings, check_resumable
from .optimizer import block_depths, make_optimizer, scale_learning_rates_by_rgn
from .strategies import STRATEGIES
from .strategies._base import Phase
from .tracking import RunTracker

__all__ = ["adapter_config", "epoch_seed", "fine_tune"]

Examples = Dataset | Sequence[dict[str, Any]]

logger = logging.getLogger(__name__)  # one line per epoch and where a run resumes (INFO, main process only)


@dataclass
class _Run:
    """What every phase of one `fine_tune` call shares."""

    args: FineTuneArguments
    accelerator: Accelerator
    model: PeftModel
    block_map: BlockMap
    train_dataset: Examples
    train_loader: DataLoader
    shuffle: torch.Generator  # the training loader's generator, seeded at the start of every epoch
    eval_loader: DataLoader | None
    progress: Progress
    resume_from: Path | None  # the checkpoint to load when its phase starts
    owns_accelerator: bool  # whether `fine_tune` made the accelerator (and so sets its DDP options)
    tracker: RunTracker  # the experiment trackers (`args.report_to`), logged after every checkpoint
    optimizer: torch.optim.Optimizer | None = None  # the current phases' optimizer (over every adapter tensor)
    optimizer_rate: float | None = None  # the learning rate it was made for


def epoch_seed(seed: int, phase: int, epoch: int, *, rgn: bool = False) -> int:
    """The seed of the training data's order in epoch `epoch` of phase `phase` (both from 0) of a run seeded `seed`
    (with `rgn`: of the batches Auto-RGN scores before that epoch).

    Example:
        >>> epoch_seed(0, 0, 1) == epoch_seed(0, 0, 1) != epoch_seed(0, 0, 2)
        True
    """
    return int(np.random.SeedSequence([seed, phase, epoch, int(rgn)]).generate_state(1, np.uint64)[0])


def _resolve_auto(
    model: nn.Module, train_dataset: Examples, args: FineTuneArguments, accelerator: Accelerator
) -> FineTuneArguments:
    """`args` with `blocks=["auto"]` replaced by the block Auto-RGN ranks first on the training data (every process
    ranks the same batches, so all agree)."""
    loader = DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    progress = args.progress and accelerator.is_main_process
    config = select_blocks(model, loader, SurgicalConfig(block=AUTO), progress=progress)
    return replace(args, blocks=config.blocks)


def adapter_config(args: FineTuneArguments) -> SurgicalConfig:
    """The config of a new adapter for `args`: every block the strategy trains.

    Example:
        >>> adapter_config(FineTuneArguments(strategy="lp-ft", blocks=["stage1"])).block
        ['head', 'stage1']
    """
    return SurgicalConfig(
        block=args.adapter_blocks(), modules_to_save=args.modules_to_save, delta_dtype=args.delta_dtype
    )


def _surgical_model(model: nn.Module, args: FineTuneArguments) -> PeftModel:
    """`model` if it is a `PeftModel` already, else with an adapter holding every block the strategy trains."""
    if isinstance(model, PeftModel):
        return model
    return quiet_get_peft_model(model, adapter_config(args))


def _tuned_batch_norms(model: PeftModel) -> list[str]:
    """The BatchNorm layers (module paths) whose parameters train: in training mode, they normalise over the batch."""
    return [
        name
        for name, module in model.base_model.model.named_modules()
        if isinstance(module, _BatchNorm) and any(p.requires_grad for p in module.parameters(recurse=False))
    ]


def _drops_last_batch(model: PeftModel, examples: int, args: FineTuneArguments, accelerator: Accelerator) -> bool:
    """Whether the training loader leaves out a last batch of one (where a BatchNorm layer trains, which a batch of
    one cannot train where its feature map is 1x1), saying so; an `InputError` where every batch would be one."""
    norms = _tuned_batch_norms(model)
    if not norms or examples < 1:
        return False
    shown = ", ".join(norms[:3]) + (f" and {len(norms) - 3} more" if len(norms) > 3 else "")
    if examples == 1 or args.batch_size == 1:
        cause = "one training image gives" if examples == 1 else "batch_size=1 (--batch-size 1) gives"
        fix = "train on at least 2 images (--train-n)" if examples == 1 else "use batch_size 2 or more (--batch-size)"
        raise InputError(
            f"{cause} batches of one image, and the tuned BatchNorm layers ({shown}) normalise each channel over the "
            f"batch, which needs more than one value per channel: {fix}, or tune a block without BatchNorm (e.g. the "
            "head)."
        )
    if examples % args.batch_size != 1:
        return False
    if accelerator.is_main_process:
        logger.info(
            f"The last batch of each epoch would hold 1 image of {examples}, which the tuned BatchNorm layers "
            f"({shown}) cannot train on (they normalise over the batch): it is left out, so each epoch trains on "
            f"{examples - 1} of the {examples} images (another one each epoch)."
        )
    return True


def _start(
    model: nn.Module,
    train_dataset: Examples,
    eval_dataset: Examples | None,
    args: FineTuneArguments,
    accelerator: Accelerator,
    owns_accelerator: bool,
    tracker: RunTracker,
    resume: tuple[Path, Progress] | None,
    identity: RunIdentity,
) -> _Run:
    peft_model = _surgical_model(model, args)
    generator = torch.Generator()
    indexed = IndexedDataset(train_dataset) if args.cache_features else train_dataset  # the cache keys by index
    drop_last = _drops_last_batch(peft_model, len(train_dataset), args, accelerator)
    if resume is not None and accelerator.is_main_process:
        checkpoint, progress = resume
        done, total = progress.epochs_of(args.phases())
        if done < total:
            logger.info(f"resuming from checkpoint {progress.number} (epoch {done} of {total}): {checkpoint}")
        else:
            logger.info(f"already complete: {total} epochs, nothing to train ({checkpoint})")
    return _Run(
        args=args,
        accelerator=accelerator,
        model=peft_model,
        block_map=list_blocks(peft_model),
        train_dataset=train_dataset,
        train_loader=DataLoader(
            indexed, batch_size=args.batch_size, shuffle=True, generator=generator, drop_last=drop_last
        ),
        shuffle=generator,
        eval_loader=DataLoader(eval_dataset, batch_size=args.batch_size) if eval_dataset is not None else None,
        progress=resume[1] if resume else Progress(identity=asdict(identity)),
        resume_from=resume[0] if resume else None,
        owns_accelerator=owns_accelerator,
        tracker=tracker,
    )


def _feature_cache(run: _Run, model: nn.Module, phase: Phase) -> FeatureCache | None:
    """The phase's feature cache when `args.cache_features` asks for one and a frozen prefix exists."""
    if not run.args.cache_features:
        return None
    first = next(iter(run.block_map))
    if phase.blocks == [ALL] or first in phase.blocks:
        warnings.warn(
            f"cache_features: the {phase.name} phase trains the first block ({first}), so no frozen prefix is left "
            "to cache; training without the cache.",
            stacklevel=4,
        )
        return None
    return FeatureCache(model, deterministic=True, max_bytes=run.args.cache_max_bytes, data=run.train_dataset)


def _refill_cache(run: _Run, loader: DataLoader, cache: FeatureCache, index: int, epochs: int) -> None:
    """Fill `cache` as the first `epochs` epochs of phase `index` filled it, batch by batch, without training."""
    run.model.eval()
    with torch.no_grad():
        for epoch in range(epochs):
            run.shuffle.manual_seed(epoch_seed(run.args.seed, index, epoch))
            for batch in loader:
                with cache.batch(batch.pop("index")):
                    run.model(pixel_values=batch["pixel_values"])


def _trainable(run: _Run) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in run.model.base_model.model.named_parameters() if p.requires_grad]


def _train_only(run: _Run, module_paths: list[str] | None) -> None:
    """`SurgicalModel.train_only(module_paths)`. Another PEFT method's adapter (LoRA, say) trains as a whole, so
    only strategies whose phases train every block (`full`) can train it; the others raise an `InputError`."""
    tuner = run.model.base_model
    if isinstance(tuner, SurgicalModel):
        tuner.train_only(module_paths)
    elif module_paths is not None:
        raise InputError(
            f"strategy={run.args.strategy!r} trains some blocks at a time, which needs a surgical adapter; this "
            f"PeftModel's is a {type(tuner).__name__}, which trains as a whole: use strategy='full'."
        )


def _optimizer(run: _Run, phase: Phase) -> torch.optim.Optimizer:
    """The optimizer of `phase`: the previous phase's when it trains at the same learning rate, so that the AdamW
    state of a block that stays trainable, or comes back, carries on (tensors out of the phase get no gradient, and
    AdamW leaves them and their state alone); else a new one over every tensor of the adapter."""
    if run.optimizer is None or run.optimizer_rate != phase.learning_rate:
        _train_only(run, None)
        trainable = _trainable(run)
        depths = block_depths(run.block_map, [name for name, _ in trainable]) if run.args.lr_decay != 1 else None
        run.optimizer = make_optimizer([p for _, p in trainable], phase.learning_rate, run.args, depths)
        run.optimizer_rate = phase.learning_rate
    return run.optimizer


def _switcher(run: _Run, phase: Phase, epoch: int, batches: int) -> Callable[[int], None] | None:
    """For a phase that trains its blocks in turn (`Phase.switch_every`): what, before each batch of epoch `epoch`,
    trains only the block whose turn it is (turns of `switch_every` optimizer steps, counted from the phase's
    start, so that a resumed epoch switches where the uninterrupted one did)."""
    if phase.switch_every is None:
        return None
    targets = [run.block_map.target_modules([block]) for block in phase.blocks]
    batches_per_turn = phase.switch_every * run.args.gradient_accumulation_steps
    current: list[int] = []

    def switch(batch: int) -> None:
        turn = ((epoch * batches + batch) // batches_per_turn) % len(targets)
        if current != [turn]:
            _train_only(run, targets[turn])
            current[:] = [turn]

    return switch


def _run_phase(run: _Run, index: int, phase: Phase) -> float | None:
    """Train `phase` from where the run stands; returns the eval accuracy after its last epoch run here, if any."""
    args, accelerator = run.args, run.accelerator
    run.model.base_model.set_requires_grad(run.model.active_adapter, True)
    optimizer = _optimizer(run, phase)
    _train_only(run, None if phase.blocks == [ALL] else run.block_map.target_modules(phase.blocks))
    parameters = [p for _, p in _trainable(run)]
    if run.owns_accelerator:
        set_unused_parameter_search(accelerator, phase.blocks, run.block_map, switches=phase.switch_every is not None)
    model, optimizer, loader = accelerator.prepare(run.model, optimizer, run.train_loader)
    eval_loader = accelerator.prepare(run.eval_loader) if run.eval_loader is not None else None
    if run.resume_from is not None and run.progress.phase == index:
        load_checkpoint(accelerator, run.resume_from)  # model, optimizer and RNG states as they were
        run.resume_from = None
    run.progress.epochs_done += [0] * (index + 1 - len(run.progress.epochs_done))
    cache = _feature_cache(run, model, phase)
    accuracy = None
    # A phase before the checkpoint's is over, even if its epochs were raised since (e.g. lp_epochs on a rerun).
    first = run.progress.epochs_done[index] if index >= run.progress.phase else phase.epochs
    if cache is not None and 0 < first < phase.epochs:
        _refill_cache(run, loader, cache, index, first)
    for epoch in range(first, phase.epochs):
        if args.lr_mode == "rgn":
            run.shuffle.manual_seed(epoch_seed(args.seed, index, epoch, rgn=True))
            scale_learning_rates_by_rgn(optimizer, model, parameters, loader, accelerator, phase.learning_rate)
        run.shuffle.manual_seed(epoch_seed(args.seed, index, epoch))
        description = f"{phase.name} epoch {epoch + 1}/{phase.epochs}"
        loss = train_epoch(
            model,
            loader,
            optimizer,
            accelerator,
            cache=cache,
            description=description,
            progress=args.progress,
            before_batch=_switcher(run, phase, epoch, len(loader)),
        )
        record: dict[str, Any] = {"phase": phase.name, "epoch": epoch + 1, "train_loss": loss}
        if eval_loader is not None:
            accuracy = record["eval_accuracy"] = evaluate_accuracy(model, eval_loader, accelerator)
        if accelerator.is_main_process:
            scored = f", eval accuracy {accuracy:.4f}" if eval_loader is not None else ""
            logger.info(f"{description}: train loss {loss:.4f}{scored}")
        run.progress.history.append(record)
        run.progress.epochs_done[index] = epoch + 1
        run.progress.phase = index
        if args.output_dir is not None:
            save_checkpoint(accelerator, args.output_dir, run.progress)
        run.tracker.log_epoch(record, step=sum(run.progress.epochs_done), learning_rate=phase.learning_rate)
    wrapped = model is not run.model
    run.model = accelerator.unwrap_model(model)
    if wrapped:  # drop the DDP/FSDP wrapper before the next phase changes what is trainable
        accelerator.free_memory()  # (it also runs gc.collect, seconds with transformers loaded: only when needed)
    return accuracy


def fine_tune(
    model: nn.Module,
    train_dataset: Examples,
    eval_dataset: Examples | None = None,
    args: FineTuneArguments | None = None,
    *,
    accelerator: Accelerator | None = None,
    run_settings: Mapping[str, Any] | None = None,
    data_fingerprint: Mapping[str, Any] | None = None,
) -> FineTuneResult:
    """Fine-tune `model` (a transformers image classifier, or a `PeftModel` with a surgical adapter) on
    `train_dataset`, a dataset of `{"pixel_values": tensor, "labels": int}` examples.

    A plain model gets a surgical adapter holding every block the strategy trains (`args.adapter_blocks()`); a
    `PeftModel` is trained as it is (its active adapter). Returns the `PeftModel` (unwrapped from DDP), the final
    metrics (`train_loss`, `eval_accuracy` when `eval_dataset` is given) and per-epoch history. With
    `args.output_dir`, every epoch is checkpointed there and a rerun resumes from the latest checkpoint, bit-identical
    to an uninterrupted run. Each checkpoint records what defines the run (`surgical_peft.training.identity`):
    `args.identity()` with `run_settings` (a caller's own settings, e.g. the command line's model and data options),
    `data_fingerprint` (`surgical_peft.data_fingerprint`) and the settings the accelerator resolved (mixed precision,
    gradient accumulation, processes); a rerun resumes only under the same, for as many epochs or more. With
    `args.report_to`, the run's settings (`args`, the model's name, the data's sizes and `run_settings`) and every
    epoch's loss and accuracy go to those trackers (`surgical_peft.training.tracking`).

    Each epoch logs one line (train loss, eval accuracy) at INFO on the main process, and a rerun says where it
    resumes (`logging.getLogger("surgical_peft")`; the command line prints them).

    Raises:
        InputError: for fp16 on a CPU, a caller's `accelerator` that names checkpoints itself or comes with
            `args.report_to` (a caller's accelerator brings its own trackers: `Accelerator(log_with=...)`), data
            whose class names (a `datasets` `ClassLabel`) are not the model's labels in its order
            (`surgical_peft.labels`), an `output_dir` whose checkpoints are another run's or a longer one's
            (`identity.check_resumable`), or only batches of one image where a BatchNorm layer trains.
        TrainingError: when a loss or a trained tensor is not finite (nothing of that epoch is saved).

    Example:
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> data = [{"pixel_values": torch.randn(3, 16, 16), "labels": i % 2} for i in range(8)]
        >>> args = FineTuneArguments(blocks=["stage1"], epochs=2, batch_size=4, progress=False)
        >>> result = fine_tune(model, data, data, args)
        >>> result.model.peft_config["default"].block, sorted(result.metrics), len(result.history)
        (['stage1'], ['eval_accuracy', 'train_loss'], 2)
    """
    args = args or FineTuneArguments()
    id2label = getattr(getattr(unwrap_model(model), "config", None), "id2label", None)
    for dataset in (train_dataset, eval_dataset):
        check_label_names(dataset, id2label)
    callers_accelerator = accelerator is not None
    if callers_accelerator and args.report_to:
        raise InputError(
            f"report_to={args.report_to} starts trackers on the Accelerator fine_tune makes. With your own "
            "accelerator, make it with Accelerator(log_with=...), call its init_trackers and log result.history."
        )
    accelerator = accelerator or make_accelerator(args)
    if args.output_dir is not None and accelerator.project_configuration.automatic_checkpoint_naming:
        raise InputError(
            "fine_tune names its checkpoints itself (under output_dir/checkpoints); pass an Accelerator without "
            "ProjectConfiguration(automatic_checkpoint_naming=True), or no output_dir."
        )
    identity = RunIdentity(
        settings=dict(sorted({**args.identity(), **(run_settings or {})}.items())),
        data=dict(data_fingerprint) if data_fingerprint is not None else None,
        accelerate=accelerate_settings(accelerator),
    )
    resume = latest_checkpoint(args.output_dir)
    if resume is not None:  # before anything is computed, loaded or logged
        check_resumable(Path(args.output_dir), resume[1], identity, args.phases(), args)
    settings = {"model": getattr(unwrap_model(model), "name_or_path", None) or type(model).__name__}
    settings.update(train_examples=len(train_dataset), eval_examples=len(eval_dataset or []), **(run_settings or {}))
    tracker = RunTracker(accelerator, args, settings)
    try:
        result = _fine_tune(
            model, train_dataset, eval_dataset, args, accelerator, callers_accelerator, tracker, resume, identity
        )
    finally:
        tracker.finish()
    if callers_accelerator:  # release what this call prepared; an accelerator of our own just goes away
        accelerator.free_memory()
    return result


def _fine_tune(
    model: nn.Module,
    train_dataset: Examples,
    eval_dataset: Examples | None,
    args: FineTuneArguments,
    accelerator: Accelerator,
    callers_accelerator: bool,
    tracker: RunTracker,
    resume: tuple[Path, Progress] | None,
    identity: RunIdentity,
) -> FineTuneResult:
    """`fine_tune` once its accelerator and trackers are set up, with the checkpoint to `resume` (checked to be this
    run's, `identity`)."""
    set_seed(args.seed)
    strategy = STRATEGIES.get(args.strategy)
    if hasattr(strategy, "run"):  # a strategy that runs itself (dp-linear-probe: full-batch NoisyGD)
        result = strategy.run(_surgical_model(model, args), train_dataset, eval_dataset, args, accelerator)
        for step, record in enumerate(result.history, start=1):  # logged once it is over
            tracker.log_epoch(record, step=step)
        return result
    if args.blocks == [AUTO]:
        args = _resolve_auto(model, train_dataset, args, accelerator)
    owns_accelerator = not callers_accelerator
    run = _start(model, train_dataset, eval_dataset, args, accelerator, owns_accelerator, tracker, resume, identity)
    last_accuracy = None  # eval accuracy after this call's last epoch
    for index, phase in enumerate(args.phases()):
        accuracy = _run_phase(run, index, phase)
        last_accuracy = accuracy if accuracy is not None else last_accuracy
    _train_only(run, None)
    history = run.progress.history
    metrics = {"train_loss": history[-1]["train_loss"] if history else math.nan}
    if run.eval_loader is not None:  # this call's last epoch scored the final weights, unless it ran none (resumed)
        metrics["eval_accuracy"] = (
            last_accuracy
            if last_accuracy is not None
            else evaluate_accuracy(run.model, accelerator.prepare(run.eval_loader), accelerator)
        )
    return FineTuneResult(model=run.model, metrics=metrics, history=history)
