"""The training loop: surgical, full, linear-probe and LP-FT fine-tuning with Accelerate.

Accelerate is the distributed engine: the same code runs on one CPU, on several processes (DDP, gloo on CPU), with
FSDP or DeepSpeed, with mixed precision and gradient accumulation, as configured by `accelerate launch`. Only the main
process shows progress bars and writes files.

Strategies (Lee et al. 2023; Kumar et al. 2022):
- `surgical`: tune the chosen blocks, freeze the rest;
- `full`: tune every block (the adapter then holds deltas for the whole model);
- `linear-probe`: tune the head only;
- `lp-ft`: linear-probe the head first, then fine-tune the chosen blocks together with the head.

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

import contextlib
import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed
from peft import PeftModel, get_peft_model
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .blocks import BlockMap, list_blocks
from .config import SurgicalConfig
from .features import FeatureCache, IndexedDataset
from .metrics import load_accuracy

__all__ = ["STRATEGIES", "FineTuneArguments", "FineTuneResult", "evaluate_accuracy", "fine_tune"]

STRATEGIES = ("surgical", "full", "linear-probe", "lp-ft")
LR_MODES = ("constant", "rgn")
_HEAD = "head"


@dataclass
class FineTuneArguments:
    """How to fine-tune. Every field has a command-line twin in `examples/train.py`.

    Args:
        strategy: one of `STRATEGIES`.
        blocks: the blocks to tune for `surgical` and `lp-ft` (see `surgical_peft.list_blocks`); `["auto"]` picks
            the best block by Auto-RGN on the training data (`surgical_peft.select_blocks`).
        epochs: passes over the training set (for `lp-ft`, the fine-tuning phase).
        lp_epochs: epochs of the linear-probe phase of `lp-ft` (default: `epochs`).
        learning_rate: AdamW learning rate (for `lp-ft`, the fine-tuning phase; the probe uses 10x).
        lr_mode: `constant`, or `rgn` to scale each tensor's learning rate by its relative gradient norm
            (Auto-RGN, Lee et al. 2023), recomputed at the start of every epoch.
        weight_decay: AdamW weight decay.
        batch_size: per-device batch size.
        gradient_accumulation_steps: optimizer step every this many batches.
        modules_to_save: modules trained and saved in full (a newly initialised head).
        delta_dtype: dtype of the saved deltas (`None`, "bfloat16", "float16").
        mixed_precision: "no", "fp16" or "bf16" for Accelerate; `None` takes it from `accelerate launch`/config.
        seed: seeds data order and initialisation on every process.
        output_dir: where checkpoints (one per epoch, the latest kept) go; a rerun resumes from the latest.
        progress: show progress bars (main process only).
        cache_features: compute the frozen prefix in front of the first trained block once per example and reuse it
            in later epochs (`surgical_peft.features.FeatureCache`); only for deterministic input pipelines (no random
            augmentation), and ignored, with a warning, in a phase that trains the first block.
        cache_max_bytes: bound on the cached features' bytes (examples beyond it are computed every epoch).
    """

    strategy: str = "surgical"
    blocks: list[str] = field(default_factory=lambda: [_HEAD])
    epochs: int = 10
    lp_epochs: int | None = None
    learning_rate: float = 1e-3
    lr_mode: str = "constant"
    weight_decay: float = 0.0
    batch_size: int = 32
    gradient_accumulation_steps: int = 1
    modules_to_save: list[str] | None = None
    delta_dtype: str | None = None
    mixed_precision: str | None = None
    seed: int = 0
    output_dir: str | None = None
    progress: bool = True
    cache_features: bool = False
    cache_max_bytes: int = 4 * 2**30

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}. Valid: {', '.join(STRATEGIES)}.")
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"Unknown lr_mode {self.lr_mode!r}. Valid: {', '.join(LR_MODES)}.")
        if "auto" in self.blocks and len(self.blocks) > 1:
            raise ValueError(f"blocks=['auto'] cannot be combined with other blocks: {self.blocks}")
        if not self.blocks and self.strategy in ("surgical", "lp-ft"):
            raise ValueError(f"strategy={self.strategy!r} needs at least one block to tune.")
        for name in ("epochs", "batch_size", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")

    def phases(self) -> list[tuple[str, list[str], int, float]]:
        """`(name, blocks trained, epochs, learning rate)` for each phase of the strategy."""
        if self.strategy == "full":
            return [("fine-tune", ["all"], self.epochs, self.learning_rate)]
        if self.strategy == "linear-probe":
            return [("linear-probe", [_HEAD], self.epochs, self.learning_rate)]
        if self.strategy == "surgical":
            return [("fine-tune", list(self.blocks), self.epochs, self.learning_rate)]
        tuned = [*self.blocks, _HEAD] if _HEAD not in self.blocks else list(self.blocks)
        lp_epochs = self.lp_epochs if self.lp_epochs is not None else self.epochs
        return [
            ("linear-probe", [_HEAD], lp_epochs, 10 * self.learning_rate),
            ("fine-tune", tuned, self.epochs, self.learning_rate),
        ]

    def adapter_blocks(self) -> list[str]:
        """The blocks the adapter holds: the union over phases."""
        blocks: list[str] = []
        for _, phase_blocks, _, _ in self.phases():
            blocks += [block for block in phase_blocks if block not in blocks]
        return blocks


@dataclass
class FineTuneResult:
    """What `fine_tune` returns: the tuned `PeftModel`, the final metrics and per-epoch history."""

    model: PeftModel
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


_PROGRESS_FILE = "progress.json"


def _latest_checkpoint(output_dir: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint under `output_dir/checkpoints` and the progress saved with it, if any."""
    if output_dir is None:
        return None
    candidates = sorted(Path(output_dir, "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    for checkpoint in reversed(candidates):
        if (checkpoint / _PROGRESS_FILE).is_file():  # written last: a checkpoint without it is incomplete
            return checkpoint, json.loads((checkpoint / _PROGRESS_FILE).read_text())
    return None


def _make_accelerator(args: FineTuneArguments) -> Accelerator:
    project = ProjectConfiguration(
        project_dir=args.output_dir, automatic_checkpoint_naming=args.output_dir is not None, total_limit=1
    )
    # A block whose output is unused in some forward (e.g. a second head) would otherwise stall DDP.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        project_config=project,
        kwargs_handlers=[ddp],
    )


def _set_trainable(model: PeftModel, module_paths: Sequence[str] | None) -> list[nn.Parameter]:
    """Restrict training to the adapter parameters under `module_paths` (all adapter parameters when `None`).

    `modules_to_save` copies (PEFT's wrappers, e.g. a newly initialised head) are trained in every phase."""
    modules = model.base_model.model.named_modules()
    wrappers = [name for name, module in modules if isinstance(module, AuxiliaryTrainingWrapper)]
    prefixes = None if module_paths is None else tuple(path + "." for path in [*module_paths, *wrappers])
    parameters = []
    for name, parameter in model.base_model.model.named_parameters():
        if not parameter.requires_grad:
            continue
        if prefixes is None or name.startswith(prefixes):
            parameters.append(parameter)
        else:
            parameter.requires_grad_(False)
    return parameters


def evaluate_accuracy(
    model: nn.Module, dataloader: DataLoader, accelerator: Accelerator | None = None, *, progress: bool = False
) -> float:
    """Top-1 accuracy of `model` on a prepared dataloader of `{"pixel_values", "labels"}` batches, gathered over all
    processes (each example counted once).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader
        >>> model = lambda pixel_values: type("Out", (), {"logits": pixel_values})()
        >>> batches = DataLoader([{"pixel_values": torch.tensor([0.0, 1.0]), "labels": 1}], batch_size=1)
        >>> evaluate_accuracy(model, batches)
        1.0
    """
    accelerator = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    metric = load_accuracy()
    was_training = getattr(model, "training", False)
    if isinstance(model, nn.Module):
        model.eval()
    bar = tqdm(dataloader, desc="evaluate", leave=False, disable=not (progress and accelerator.is_main_process))
    with torch.no_grad():
        for batch in bar:
            logits = model(pixel_values=batch["pixel_values"]).logits
            predictions, references = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
            metric.add_batch(predictions=predictions.cpu(), references=references.cpu())
    if was_training:
        model.train()
    return float(metric.compute()["accuracy"])


def _epoch_lr_scales(
    model: PeftModel, parameters: list[nn.Parameter], dataloader: DataLoader, accelerator: Accelerator
) -> list[float]:
    from .selection import relative_gradient_norms  # the Auto-RGN criterion lives with block selection

    norms = relative_gradient_norms(model, dataloader, parameters=parameters, accelerator=accelerator)
    largest = max(norms) or 1.0
    return [value / largest for value in norms]


def _select_blocks(
    model: nn.Module,
    train_dataset: Dataset | Sequence[dict[str, Any]],
    args: FineTuneArguments,
    accelerator: Accelerator,
) -> FineTuneArguments:
    """`args` with `blocks=["auto"]` replaced by the block Auto-RGN ranks first on the training data (every process
    ranks the same batches, so all agree)."""
    from .selection import select_blocks

    loader = DataLoader(
        train_dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    progress = args.progress and accelerator.is_main_process
    return replace(args, blocks=select_blocks(model, loader, SurgicalConfig(block="auto"), progress=progress).blocks)


def fine_tune(
    model: nn.Module,
    train_dataset: Dataset | Sequence[dict[str, Any]],
    eval_dataset: Dataset | Sequence[dict[str, Any]] | None = None,
    args: FineTuneArguments | None = None,
    *,
    accelerator: Accelerator | None = None,
) -> FineTuneResult:
    """Fine-tune `model` (a transformers image classifier, or a `PeftModel` with a surgical adapter) on
    `train_dataset`, a dataset of `{"pixel_values": tensor, "labels": int}` examples.

    A plain model gets a surgical adapter holding every block the strategy trains (`args.adapter_blocks()`); a
    `PeftModel` is trained as it is (its active adapter). Returns the `PeftModel` (unwrapped from DDP), the final
    metrics (`train_loss`, `eval_accuracy` when `eval_dataset` is given) and per-epoch history. With
    `args.output_dir`, every epoch is checkpointed there and a rerun resumes from the latest checkpoint.
    """
    args = args or FineTuneArguments()
    callers_accelerator = accelerator is not None
    accelerator = accelerator or _make_accelerator(args)
    set_seed(args.seed)
    if args.blocks == ["auto"]:
        args = _select_blocks(model, train_dataset, args, accelerator)
    if isinstance(model, PeftModel):
        peft_model = model
    else:
        config = SurgicalConfig(
            block=args.adapter_blocks(), modules_to_save=args.modules_to_save, delta_dtype=args.delta_dtype
        )
        peft_model = get_peft_model(model, config)
    block_map = list_blocks(peft_model)
    generator = torch.Generator().manual_seed(args.seed)
    indexed = IndexedDataset(train_dataset) if args.cache_features else train_dataset  # the cache keys by index
    train_loader = DataLoader(indexed, batch_size=args.batch_size, shuffle=True, generator=generator)
    eval_loader = DataLoader(eval_dataset, batch_size=args.batch_size) if eval_dataset is not None else None

    resume = _latest_checkpoint(args.output_dir)
    epochs_done: list[int] = resume[1]["epochs_done"] if resume else []
    history: list[dict[str, Any]] = resume[1]["history"] if resume else []
    last_accuracy: float | None = None  # eval accuracy after this call's last epoch
    for phase_index, (phase, blocks, epochs, learning_rate) in enumerate(args.phases()):
        # Each phase trains a different set of tensors, so it gets its own optimizer and DDP wrapper.
        peft_model.base_model.set_requires_grad(peft_model.active_adapter, True)
        parameters = _set_trainable(peft_model, None if blocks == ["all"] else block_map.target_modules(blocks))
        per_tensor = args.lr_mode == "rgn"
        groups = [{"params": [p]} for p in parameters] if per_tensor else [{"params": parameters}]
        optimizer = torch.optim.AdamW(groups, lr=learning_rate, weight_decay=args.weight_decay)
        prepared_model, optimizer, loader = accelerator.prepare(peft_model, optimizer, train_loader)
        prepared_eval = accelerator.prepare(eval_loader) if eval_loader is not None else None
        if resume is not None and resume[1]["phase"] == phase_index:
            accelerator.load_state(str(resume[0]))  # model, optimizer and RNG states as they were
            resume = None
        epochs_done += [0] * (phase_index + 1 - len(epochs_done))
        cache = _feature_cache(prepared_model, train_dataset, args, phase, blocks, block_map)

        for epoch in range(epochs_done[phase_index], epochs):
            if per_tensor:
                scales = _epoch_lr_scales(prepared_model, parameters, loader, accelerator)
                for group, scale in zip(optimizer.param_groups, scales, strict=True):
                    group["lr"] = learning_rate * scale
            prepared_model.train()
            total, count = torch.zeros((), device=accelerator.device), 0
            bar = tqdm(
                loader,
                desc=f"{phase} epoch {epoch + 1}/{epochs}",
                leave=False,
                disable=not (args.progress and accelerator.is_main_process),
            )
            for batch in bar:
                indices = batch.pop("index", None)
                with accelerator.accumulate(prepared_model):
                    with cache.batch(indices) if cache is not None else contextlib.nullcontext():
                        loss = prepared_model(pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
                    accelerator.backward(loss)
                    optimizer.step()
                    optimizer.zero_grad()
                total += loss.detach()
                count += 1
                if not bar.disable:  # `.item()` waits for the device: only for a bar someone sees
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            record: dict[str, Any] = {
                "phase": phase,
                "epoch": epoch + 1,
                "train_loss": float(accelerator.reduce(total, reduction="mean")) / max(count, 1),
            }
            if prepared_eval is not None:
                last_accuracy = record["eval_accuracy"] = evaluate_accuracy(prepared_model, prepared_eval, accelerator)
            history.append(record)
            epochs_done[phase_index] = epoch + 1
            if args.output_dir is not None:
                _checkpoint(accelerator, phase_index, epochs_done, history)
        wrapped = prepared_model is not peft_model
        peft_model = accelerator.unwrap_model(prepared_model)
        if wrapped:  # drop the DDP/FSDP wrapper before the next phase changes what is trainable
            accelerator.free_memory()  # (it also runs gc.collect, seconds with transformers loaded: only when needed)

    peft_model.base_model.set_requires_grad(peft_model.active_adapter, True)
    metrics = {"train_loss": history[-1]["train_loss"] if history else math.nan}
    if eval_loader is not None:  # this call's last epoch scored the final weights, unless it ran none (resumed)
        metrics["eval_accuracy"] = (
            last_accuracy
            if last_accuracy is not None
            else evaluate_accuracy(peft_model, accelerator.prepare(eval_loader), accelerator)
        )
    if callers_accelerator:  # release what this call prepared; an accelerator of our own just goes away
        accelerator.free_memory()
    return FineTuneResult(model=peft_model, metrics=metrics, history=history)


def _feature_cache(
    model: nn.Module,
    train_dataset: Dataset | Sequence[dict[str, Any]],
    args: FineTuneArguments,
    phase: str,
    blocks: list[str],
    block_map: BlockMap,
) -> FeatureCache | None:
    """The phase's feature cache when `args.cache_features` asks for one and a frozen prefix exists."""
    if not args.cache_features:
        return None
    if blocks == ["all"] or next(iter(block_map)) in blocks:
        warnings.warn(
            f"cache_features: the {phase} phase trains the first block ({next(iter(block_map))}), so no frozen "
            "prefix is left to cache; training without the cache.",
            stacklevel=3,
        )
        return None
    return FeatureCache(model, deterministic=True, max_bytes=args.cache_max_bytes, data=train_dataset)


def _checkpoint(accelerator: Accelerator, phase: int, epochs_done: list[int], history: list[dict[str, Any]]) -> None:
    """Save model, optimizer and RNG states, then the progress file that marks the checkpoint complete."""
    location = Path(accelerator.save_state())
    if accelerator.is_main_process:
        progress = {"phase": phase, "epochs_done": epochs_done, "history": history}
        (location / _PROGRESS_FILE).write_text(json.dumps(progress, indent=1))
    accelerator.wait_for_everyone()
