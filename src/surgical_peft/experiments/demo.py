"""The paper's headline experiment at small scale, offline, in a few minutes on a CPU.

Lee et al. (ICLR 2023) show that under an input-level shift (image corruptions), fine-tuning only the *first* block
of a pretrained network on a small labelled target set adapts it as well as or better than fine-tuning everything.
This demo reproduces that on scikit-learn's handwritten digits:

1. pretrain a small ResNet on a clean source half of the digits (cached with `save_pretrained`, so a rerun skips it);
2. build the shifted target from the other half (default: contrast at severity 5, which the source model fails on);
3. fine-tune each block in turn (embedder, stage1..4, head) and the whole model on `train_n` labelled target images,
   picking each one's learning rate on a target validation split, then repeating it with other seeds;
4. print the target accuracy per tuned block (and without fine-tuning), and save a bar chart.

Run it with `python examples/train.py` (no arguments) or `surgical-peft demo` (`surgical-peft demo --help` lists
its options).

Example:
    >>> from surgical_peft.experiments.demo import source_config
    >>> source_config().hidden_sizes
    [16, 32, 64, 128]
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from statistics import mean, pstdev
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import ResNetConfig, ResNetForImageClassification

from ..blocks import list_blocks
from ..files import staged_directory, write_file
from ..plots import bar_chart
from ..training import FineTuneArguments, evaluate_accuracy, fine_tune
from .data import check_shift, load_digits, make_target, preprocess, split_source_target, split_target
from .shifts import CORRUPTIONS

__all__ = [
    "DEFAULT_SHIFT",
    "SOURCE_MODEL",
    "DemoResult",
    "default_cache_dir",
    "demo",
    "is_cached",
    "source_config",
    "source_model",
    "source_model_path",
]

SOURCE_MODEL = "demo-resnet"
"""The name of the demo's small ResNet, pretrained on the source half of the digits (`source_model`), wherever it is
named: the command line's built-in model, run and cache directory names."""

DEFAULT_SHIFT = "contrast"
"""The demo's target shift: contrast at severity 5 takes the source model from about 98% to under 20% accuracy (the
noise corruptions barely affect it on upsampled digits)."""

_IMAGE_SIZE = 32
_PRETRAIN_EPOCHS = 10
_PRETRAIN_LEARNING_RATE = 1e-3  # at 3e-3 the last epoch's held-out accuracy swung from 88% to 99% with the seed
_PRETRAIN_DTYPE = torch.float64  # see `source_model`
_RECIPE = "r2"  # in the cache's directory names: a source model cached by another recipe is not reused
_SOURCE_METRICS = "surgical_peft_source.json"
_FULL = "full"
_NONE = "no fine-tuning"


def source_config() -> ResNetConfig:
    """The demo's small ResNet (311K parameters) for the 10 digit classes at 32x32 pixels.

    Example:
        >>> source_config().image_size
        32
    """
    config = ResNetConfig(
        embedding_size=16,
        hidden_sizes=[16, 32, 64, 128],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=10,
        id2label={index: str(index) for index in range(10)},
    )
    config.image_size = _IMAGE_SIZE  # read by surgical_peft.cli.models to size the images
    return config


def default_cache_dir() -> Path:
    """Where source models are cached: `$SURGICAL_PEFT_CACHE`, else (also when it is empty) `~/.cache/surgical_peft`.

    Example:
        >>> import os
        >>> from pathlib import Path
        >>> from unittest import mock
        >>> with mock.patch.dict(os.environ, {"SURGICAL_PEFT_CACHE": "/data/models"}):
        ...     print(default_cache_dir())
        /data/models
        >>> with mock.patch.dict(os.environ, {"SURGICAL_PEFT_CACHE": ""}):  # set but empty: not the working directory
        ...     print(default_cache_dir().relative_to(Path.home()))
        .cache/surgical_peft
    """
    return Path(os.environ.get("SURGICAL_PEFT_CACHE") or Path.home() / ".cache" / "surgical_peft")


@contextmanager
def _one_thread() -> Iterator[None]:
    # The demo's tensors are tiny: intra-op threads cost more than they bring, and on a busy machine two threads per
    # process made a training step 20x slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def source_model_path(shift: str = "none", *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `source_model` caches the demo's source model for `shift` and `seed` (it may not be there yet); an
    `InputError` for an unknown shift (whose source would otherwise be the clean one).

    Example:
        >>> source_model_path("fog", cache_dir="/cache").as_posix()
        '/cache/demo-resnet-clean-seed0-r2'
    """
    kind = shift if check_shift(shift) in ("spurious", "subpopulation") else "clean"
    return Path(cache_dir or default_cache_dir()) / f"{SOURCE_MODEL}-{kind}-seed{seed}-{_RECIPE}"


def is_cached(path: Path) -> bool:
    """Whether `path` (from `source_model_path`) holds a complete source model.

    Example:
        >>> import tempfile
        >>> is_cached(source_model_path("fog", cache_dir=tempfile.mkdtemp()))  # not pretrained there yet
        False
    """
    return (path / _SOURCE_METRICS).is_file()  # written last: its presence marks a complete cache entry


@torch.no_grad()
def _initialise(model: nn.Module, seed: int) -> None:
    """Draw `model`'s weights as transformers initialises a ResNet (He-normal convolutions, PyTorch's default linear
    layers, BatchNorm at the identity), each module from a generator of its own, seeded by `seed` and the module's
    name: the weights depend neither on the order in which a transformers release initialises modules nor on
    torch's global RNG."""
    for name, module in model.named_modules():
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # (torch keeps 32 bits)
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
        elif isinstance(module, nn.Linear):
            nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(module.in_features)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()


def source_model(
    shift: str = "none", *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, progress: bool = True
) -> Path:
    """The directory of the demo's source model for `shift`, pretrained on the source half of the digits if needed.

    The source half is clean, except for `spurious` and `subpopulation`, whose shifts define their own source (see
    `surgical_peft.experiments.data.split_source_target`). The model is saved with `save_pretrained` under
    `cache_dir` (default: `default_cache_dir()`) together with its held-out source accuracy, so later calls return
    at once.

    The same on every machine and release: its weights are drawn by `_initialise`, and it is pretrained in float64
    (saved in float32). Pretrained in float32, ten epochs amplified the last-bit differences between CPUs' vector
    kernels (AVX-512 against AVX2) into another model, which moved the demo's head row from 66.3% to 82.8%; in
    float64 the saved weights agree but for a few last bits (`benchmarks/demo.py` compares the two). Pretraining
    takes about 15 s on a 2-core CPU.

    Example:
        >>> import tempfile
        >>> cache = tempfile.mkdtemp()
        >>> source_model("rain", cache_dir=cache)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: Unknown shift 'rain'; valid choices: gaussian_noise, shot_noise, ...
        >>> path = source_model("fog", cache_dir=cache, progress=False)  # doctest: +SKIP
        >>> is_cached(path), ResNetForImageClassification.from_pretrained(path).num_labels  # doctest: +SKIP
        (True, 10)
    """
    path = source_model_path(shift, seed=seed, cache_dir=cache_dir)
    if is_cached(path):
        return path
    source = split_source_target(load_digits(_IMAGE_SIZE), shift, seed=seed)["source"]
    parts = split_target(source, train_n=source.num_rows * 9 // 10, seed=seed)
    model = ResNetForImageClassification(source_config())
    _initialise(model, seed)
    args = FineTuneArguments(
        strategy="full",
        epochs=_PRETRAIN_EPOCHS,
        learning_rate=_PRETRAIN_LEARNING_RATE,
        batch_size=32,
        seed=seed,
        progress=progress,
    )
    train, held_out = (_in_memory(parts[name], _PRETRAIN_DTYPE) for name in ("train", "eval"))
    with _one_thread():
        result = fine_tune(model.to(_PRETRAIN_DTYPE), train, held_out, args)
    with staged_directory(path) as staging:  # another process may have cached it first: kept
        result.model.merge_and_unload().float().save_pretrained(staging)
        (staging / _SOURCE_METRICS).write_text(json.dumps({"source_accuracy": result.metrics["eval_accuracy"]}))
    return path


@dataclass
class DemoResult:
    """The demo's results: target accuracy (mean and standard deviation over seeds) and learning rate per row.

    Example:
        >>> result = DemoResult(
        ...     accuracy={"no fine-tuning": 0.15, "stage1": 0.8, "head": 0.4}, std={"stage1": 0.01, "head": 0.02},
        ...     learning_rate={"stage1": 1e-3, "head": 1e-2}, source_accuracy=0.98, best="stage1", chart="demo.png",
        ...     seconds=90.0)
        >>> print(result.table())
        tuned block           lr  target accuracy
        no fine-tuning         -   15.0%
        stage1             1e-03   80.0% ± 1.0  <- best
        head               1e-02   40.0% ± 2.0
    """

    accuracy: dict[str, float]
    std: dict[str, float]
    learning_rate: dict[str, float]
    source_accuracy: float
    best: str
    chart: str
    seconds: float
    settings: dict[str, object] = field(default_factory=dict)

    def table(self) -> str:
        """The results as a plain-text table."""
        lines = [f"{'tuned block':<16}{'lr':>8}  target accuracy"]
        for row, accuracy in self.accuracy.items():
            lr = f"{self.learning_rate[row]:.0e}" if row in self.learning_rate else "-"
            spread = f" ± {100 * self.std[row]:.1f}" if row in self.std else ""
            marker = "  <- best" if row == self.best else ""
            lines.append(f"{row:<16}{lr:>8}  {100 * accuracy:5.1f}%{spread}{marker}")
        return "\n".join(lines)


def _tune(base: nn.Module, row: str, train: Sequence[dict[str, Any]], args: FineTuneArguments) -> nn.Module:
    """A copy of `base` with `row` (a block, or `full`) fine-tuned on `train`."""
    args = replace(args, strategy="full") if row == _FULL else replace(args, blocks=[row])
    return fine_tune(copy.deepcopy(base), train, None, args).model


def _in_memory(split: Dataset, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """`split` preprocessed once into tensors of `dtype`: the demo reads every split dozens of times."""
    batch = preprocess(split, image_size=_IMAGE_SIZE)[:]
    pixels, labels = batch["pixel_values"], batch["labels"]
    return [{"pixel_values": image.to(dtype), "labels": label} for image, label in zip(pixels, labels, strict=True)]


def _accuracy(model: nn.Module, dataset: Sequence[dict[str, Any]]) -> float:
    return evaluate_accuracy(model, DataLoader(dataset, batch_size=256))


def _row(
    base: nn.Module,
    row: str,
    splits: tuple[Sequence[dict[str, Any]], ...],
    args: FineTuneArguments,
    learning_rates: Sequence[float],
    repeats: int,
    bar: tqdm,
) -> tuple[float, list[float]]:
    """One row of the table: the learning rate picked on the validation split, and the test accuracy of each run."""
    train, val, test = splits
    tuned = {}  # learning rate -> (validation accuracy, model)
    for learning_rate in learning_rates:
        model = _tune(base, row, train, replace(args, learning_rate=learning_rate))
        tuned[learning_rate] = (_accuracy(model, val), model)
        bar.update()
    chosen = max(learning_rates, key=lambda learning_rate: tuned[learning_rate][0])
    runs = [_accuracy(tuned[chosen][1], test)]
    for repeat in range(1, repeats):
        model = _tune(base, row, train, replace(args, learning_rate=chosen, seed=args.seed + repeat))
        runs.append(_accuracy(model, test))
        bar.update()
    return chosen, runs


def demo(
    *,
    shift: str = DEFAULT_SHIFT,
    severity: int = 5,
    train_n: int = 150,
    val_n: int = 100,
    epochs: int = 10,
    learning_rates: Sequence[float] = (1e-3, 3e-3, 1e-2),
    repeats: int = 3,
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    output_dir: str | os.PathLike[str] = "outputs/demo",
    progress: bool = True,
) -> DemoResult:
    """Run the demo (see the module docstring), print its table and write `demo.png` and `results.json`.

    Args:
        shift: the target shift, one of `surgical_peft.experiments.data.SHIFTS`.
        severity: corruption severity, 1 to 5.
        train_n: labelled target images to fine-tune on.
        val_n: target images to pick each row's learning rate on.
        epochs: fine-tuning epochs.
        learning_rates: the learning rates tried for every row (with seed `seed`).
        repeats: runs per row at its chosen learning rate (seeds `seed`, `seed + 1`, ...), for the mean and spread.
        seed: seeds the data splits, the source model and the first run.
        cache_dir: where the source model is cached (default: `default_cache_dir()`).
        output_dir: where the chart and the results go.
        progress: show progress bars and the table.

    Returns:
        A `DemoResult`.

    The defaults take about 1.5 minutes on 2 busy CPU cores (10-20 s less once the source model is cached).

    Example:
        >>> import tempfile
        >>> folder = tempfile.mkdtemp()
        >>> result = demo(cache_dir=folder, output_dir=folder, progress=False)  # doctest: +SKIP
        >>> result.best in result.accuracy, sorted(path.name for path in Path(folder).iterdir())  # doctest: +SKIP
        (True, ['demo-resnet-clean-seed0-r2', 'demo.png', 'results.json'])
        >>> demo(shift="rain", cache_dir=folder, output_dir=folder)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: Unknown shift 'rain'; valid choices: gaussian_noise, shot_noise, ...
    """
    start = time.perf_counter()
    splits = make_target(load_digits(_IMAGE_SIZE), shift, train_n=train_n + val_n, severity=severity, seed=seed)
    labelled = split_target(splits["train"], train_n, val_n, seed=seed)
    train, val, test = (_in_memory(split) for split in (labelled["train"], labelled["eval"], splits["eval"]))
    source = source_model(shift, seed=seed, cache_dir=cache_dir, progress=progress)
    source_accuracy = json.loads((source / _SOURCE_METRICS).read_text())["source_accuracy"]
    base = ResNetForImageClassification.from_pretrained(source)
    rows = [*list_blocks(base), _FULL]

    with _one_thread():
        accuracy = {_NONE: _accuracy(base, test)}
        std, chosen = {}, {}
        args = FineTuneArguments(epochs=epochs, batch_size=16, seed=seed, progress=False)
        bar = tqdm(total=len(rows) * (len(learning_rates) + repeats - 1), desc="demo", disable=not progress)
        for row in rows:
            chosen[row], runs = _row(base, row, (train, val, test), args, learning_rates, repeats, bar)
            accuracy[row], std[row] = mean(runs), pstdev(runs)
        bar.close()

    best = max(rows, key=accuracy.get)
    target = f"{shift} (severity {severity})" if shift in CORRUPTIONS else shift
    output = Path(output_dir)
    chart = bar_chart(
        {row: 100 * value for row, value in accuracy.items()},
        output / "demo.png",
        title=f"Digits under {target}, {train_n} labelled target images",
        ylabel="target accuracy (%)",
        errors={row: 100 * value for row, value in std.items()},
        highlight=best,
    )
    settings = {"shift": shift, "severity": severity, "train_n": train_n, "val_n": val_n, "epochs": epochs}
    settings.update(test_n=splits["eval"].num_rows, repeats=repeats, seed=seed, source_model=str(source))
    result = DemoResult(
        accuracy, std, chosen, source_accuracy, best, str(chart), time.perf_counter() - start, settings
    )
    write_file(output / "results.json", json.dumps(asdict(result), indent=1))
    if progress:
        print(
            f"Source model: small ResNet, {100 * source_accuracy:.1f}% on held-out source digits. Target: {target}, "
            f"{train_n} labelled images, tested on {splits['eval'].num_rows}."
        )
        print(result.table())
        print(f"Best: {best}. Chart: {chart} ({result.seconds:.0f} s)")
    return result
