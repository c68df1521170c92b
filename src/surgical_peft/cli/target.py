"""A run's model and target data, for `train`, `rank` and `--dry-run` alike: one pipeline from the run's settings
(`RunArguments`) to what training needs (`Target`).

`load_target` loads the dataset, matches its classes to the model's labels by name (`surgical_peft.labels`), loads
the model with the head that matching asks for, cuts the target's splits, shifts them, and sizes and preprocesses the
images (`--image-size`, else the model's image processor, config or timm config, else the images' own size, at most
224: small images are not upscaled).

The built-in demo (the model `demo-resnet` on the dataset `digits`) is the paper's experiment: the digits are split
into a source half, which the model is pretrained on, and a target half, shifted by default. With your own model or
your own dataset, the whole dataset is the target and nothing is shifted unless `--shift` asks. A source half is still
cut off when something needs it, and the message says what: a shift that defines both halves (`spurious`,
`subpopulation`), or public data for `--pca-dim`.

Example (a few seconds: the built-in model's architecture, not pretrained, on the digits)::

    target = load_target(RunArguments(data=DataArguments(train_n=100), dry_run=True))
    print(target.describe())  # Data: ..., Labels: ..., Image size: 32x32 pixels (the model's config)
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets

from ..data_fingerprint import fingerprint_data
from ..errors import InputError
from ..experiments import demo
from ..experiments.data import DEFAULT_TRAIN_N, DIGITS, SOURCE_SHIFTS, load_image_dataset, make_target
from ..experiments.shifts import SEVERITIES
from ..labels import LabelMap, match_labels
from .arguments import RunArguments, is_builtin_demo
from .models import ImageSize, LoadedModel, load_model, model_labels

__all__ = ["Target", "image_size_for", "load_target"]

_PRIVATE_STRATEGY = "dp-linear-probe"  # the strategy that fits a PCA basis on public data
_LARGEST_OWN_SIZE = 224  # the images' own size is used up to this side; larger ones are resized down to it
_SIZE_SAMPLE = 32  # images whose size is read, spread over the dataset


@dataclass
class Target:
    """What a run trains (or ranks) on: the loaded model, how the dataset's labels met its labels, the image size and
    where it came from, the model-ready splits (`train`; `eval` unless none was asked for; self-training's
    `unlabeled`; the `public` data a private PCA is fitted on), the number of images per split (with the `source` half
    when one was cut off), a line saying how many went where and why, and the dataset's `fingerprint`
    (`surgical_peft.data_fingerprint`; for the built-in digits, their name and number), which checkpoints record."""

    model: LoadedModel
    labels: LabelMap
    image_size: ImageSize
    train: datasets.Dataset
    eval: datasets.Dataset | None
    unlabeled: datasets.Dataset | None
    public: datasets.Dataset | None
    counts: dict[str, int]
    message: str
    fingerprint: dict[str, Any]

    def describe(self) -> str:
        """The data, labels and image size lines a run prints."""
        return f"{self.message}\n{self.labels.describe()}\nImage size: {self.image_size}."


def _uses_source_half(run: RunArguments) -> bool:
    """Whether the run's public data is the source half of the dataset: `--pca-dim` without `--public-dataset`."""
    privacy = run.fine_tune.privacy
    return (
        run.fine_tune.strategy == _PRIVATE_STRATEGY
        and privacy is not None
        and privacy.pca_dim is not None
        and run.data.public_dataset is None
    )


def _split_reason(run: RunArguments) -> str | None:
    """Why a source half is cut off the dataset (`None`: it is not, the whole dataset is the target)."""
    if run.data.shift in SOURCE_SHIFTS:
        return f"the {run.data.shift} shift defines a source and a target half"
    if is_builtin_demo(run.model.model, run.data.dataset):
        return f"{demo.SOURCE_MODEL}, the built-in demo's model, is pretrained on the source half"
    if _uses_source_half(run):
        return "--pca-dim fits its basis on the source half, public data"
    return None


def _describe(run: RunArguments, total: int, counts: dict[str, int], reason: str | None, use: str) -> str:
    data = run.data
    shift = "no shift" if data.shift == "none" else f"shift {data.shift}"
    shift += f" at severity {data.severity}" if data.severity is not None else ""
    split = f"{counts['train']} for {use}"
    split += f", {counts['eval']} for evaluation" if "eval" in counts else ""
    split += f", {counts['unlabeled']} unlabelled (self-training)" if "unlabeled" in counts else ""
    if data.train_n is None and "eval" in counts:
        split += " (the default split: --train-n and --eval-n set it)"
    elif data.train_n is None:
        split += f" (the default: all of them, at most {DEFAULT_TRAIN_N}; --train-n sets it)"
    if reason is None:
        return f"Data: all {total} images of {data.dataset} are the target ({shift}): {split}."
    return (
        f"Data: {total} images of {data.dataset}, split into a source half ({counts['source']}) and a target half "
        f"({total - counts['source']}) because {reason}; target {shift}: {split}."
    )


@contextlib.contextmanager
def _dataset_cache(dry_run: bool, source: str) -> Iterator[str | None]:
    """Where `datasets` prepares a local dataset (`None`: its own cache). A dry run writes nothing that stays: what
    `datasets` prepares and caches then goes to a temporary directory, deleted afterwards."""
    if not dry_run:
        yield None
        return
    caching = datasets.is_caching_enabled()
    datasets.disable_caching()  # splits and shifts write their results into temporary files instead
    try:
        with tempfile.TemporaryDirectory(prefix="surgical-peft-dry-run-") as directory:
            yield directory if os.path.isdir(source) else None  # (a Hub dataset is read from its cache)
    finally:
        if caching:
            datasets.enable_caching()


def _images_size(dataset: datasets.Dataset) -> ImageSize:
    """The images' own side (the median longer side of a sample spread over the dataset), at most 224."""
    step = max(1, math.ceil(dataset.num_rows / _SIZE_SAMPLE))
    sides = sorted(max(image.size) for image in dataset.select(range(0, dataset.num_rows, step))["image"])
    side = sides[len(sides) // 2]
    if side > _LARGEST_OWN_SIZE:
        return ImageSize(_LARGEST_OWN_SIZE, f"the images are {side} pixels, resized down")
    return ImageSize(side, "the images' own; the model names none")


def image_size_for(loaded: LoadedModel, dataset: datasets.Dataset, requested: int | None = None) -> ImageSize:
    """The side the images of `dataset` are resized to for `loaded`: `requested` (`--image-size`), else the one the
    model asks for (`LoadedModel.input_size`), else the images' own, at most 224."""
    if requested:
        return ImageSize(requested, "--image-size")
    return loaded.input_size() or _images_size(dataset)


def _public_data(run: RunArguments, source: datasets.Dataset | None) -> datasets.Dataset | None:
    """The public images a private run fits its PCA basis on: `--public-dataset`, else the built-in digits' source
    half (clean digits, what the built-in model was pretrained on); `None` when no PCA is asked for."""
    privacy = run.fine_tune.privacy
    if run.fine_tune.strategy != _PRIVATE_STRATEGY or privacy is None or privacy.pca_dim is None:
        return None
    if _uses_source_half(run):
        return source
    data = run.data
    return load_image_dataset(
        data.public_dataset, split=data.split, image_column=data.image_column, label_column=data.label_column
    )


def _load_model(run: RunArguments, labels: LabelMap, state: Any) -> LoadedModel:
    """The run's model with the head `labels` asks for; the built-in one is pretrained (and cached) first, except in a
    dry run, which takes it from the cache or else its architecture, untrained."""
    model, seed = run.model, run.fine_tune.seed
    cached = demo.is_cached(demo.source_model_path(run.data.shift, seed=seed, cache_dir=model.cache_dir))
    return load_model(
        model.model,
        labels=labels,
        pretrained=cached or not run.dry_run,
        shift=run.data.shift,
        seed=seed,
        cache_dir=model.cache_dir,
        state=state,
        progress=run.fine_tune.progress and (state is None or state.is_main_process),
    )


def load_target(run: RunArguments, *, use: str = "training", keep_head: bool = False, state: Any = None) -> Target:
    """The model and the target data of `run` (see the module's docstring).

    Args:
        run: the run's settings; `run.data.eval_n=0` cuts no evaluation split (`rank` only ranks); a dry run writes
            nothing (`datasets` caches into a temporary directory) and pretrains no model.
        use: what the `train` split is for, in the message.
        keep_head: use the model's head as it is (`rank`): a dataset whose classes need a new head is refused.
        state: Accelerate's process state, so that only the main process pretrains the built-in model.

    Raises:
        InputError: for a dataset or model that cannot be loaded, labels that are other names than the model's (or
            that need a new head, with `keep_head`), a bad shift or severity, or too few images.
    """
    data = run.data
    with _dataset_cache(run.dry_run, data.dataset) as cache_dir:
        dataset = load_image_dataset(
            data.dataset,
            split=data.split,
            image_column=data.image_column,
            label_column=data.label_column,
            skip_unreadable=data.skip_unreadable_images,
            cache_dir=cache_dir,
        )
        builtin = {"source": DIGITS, "rows": dataset.num_rows}  # scikit-learn's, unchanging
        fingerprint = builtin if data.dataset == DIGITS else fingerprint_data(data.dataset, dataset)
        names, model_names = dataset.features["label"].names, model_labels(run.model.model)
        labels = match_labels(names, model_names, new_head=run.model.new_head)
        if keep_head and labels.new_head:
            raise InputError(
                f"{data.dataset!r} has {len(names)} classes but the model's head predicts {len(model_names or {})}: "
                "use a model fine-tuned for this label set (e.g. one saved by 'surgical-peft train')."
            )
        loaded = _load_model(run, labels, state)
        if labels.kind in ("permuted", "subset"):
            dataset = dataset.align_labels_with_mapping(labels.label2id, "label")
        reason = _split_reason(run)
        splits = _cut(run, dataset, reason)
        counts = {name: split.num_rows for name, split in splits.items()}
        image_size = image_size_for(loaded, dataset, data.image_size)
        raw = {name: splits.get(name) for name in ("train", "eval", "unlabeled")}
        raw["public"] = _public_data(run, splits.get("source"))
        prepared = {
            name: None if split is None else loaded.preprocess(split, image_size) for name, split in raw.items()
        }
    return Target(
        model=loaded,
        labels=labels,
        image_size=image_size,
        train=prepared["train"],
        eval=prepared["eval"],
        unlabeled=prepared["unlabeled"],
        public=prepared["public"],
        counts=counts,
        message=_describe(run, dataset.num_rows, counts, reason, use),
        fingerprint=fingerprint,
    )


def _cut(run: RunArguments, dataset: datasets.Dataset, reason: str | None) -> datasets.DatasetDict:
    """The target's splits (and the source half, when `reason` says why one is cut off), shifted."""
    data = run.data
    try:
        return make_target(
            dataset,
            data.shift,
            train_n=data.train_n,
            eval_n=data.eval_n,
            unlabeled_n=data.unlabeled_n,
            severity=data.severity or SEVERITIES[-1],
            seed=run.fine_tune.seed,
            split_source=reason is not None,
        )
    except InputError as error:
        if reason is None:
            raise
        raise InputError(f"{error} The {dataset.num_rows} images were split into a source and a target half "
                         f"because {reason}.") from error  # fmt: skip
