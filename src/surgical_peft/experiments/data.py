"""Image classification data: loading (Hub, local `imagefolder`, built-in digits), target splits and preprocessing.

Everything here returns `datasets` objects. `load_image_dataset` normalises any source to two columns, `image`
(`datasets.Image`) and `label` (`datasets.ClassLabel`), which is what `surgical_peft.experiments.shifts` expects by
default; `preprocess` turns such a dataset into the `{"pixel_values", "labels"}` examples `surgical_peft.training`
trains on.

Example:
    >>> from surgical_peft.experiments.data import load_image_dataset, preprocess, split_target
    >>> digits = load_image_dataset("digits")
    >>> digits.column_names, digits.num_rows
    (['image', 'label'], 1797)
    >>> splits = split_target(digits, train_n=100, eval_n=50, seed=0)
    >>> example = preprocess(splits["train"], image_size=32)[0]
    >>> tuple(example["pixel_values"].shape), type(example["labels"]).__name__
    ((3, 32, 32), 'int')
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..errors import InputError
from . import shifts
from .images import to_rgb, unreadable_mode

__all__ = [
    "DEFAULT_TRAIN_N",
    "DIGITS",
    "SHIFTS",
    "SOURCE_SHIFTS",
    "check_shift",
    "default_train_n",
    "image_transform",
    "load_digits",
    "load_image_dataset",
    "load_image_processor",
    "make_target",
    "preprocess",
    "split_source_target",
    "split_target",
]

DIGITS = "digits"
"""Name of the built-in offline source: scikit-learn's 1,797 handwritten 8x8 digits, upsampled."""

SHIFTS: tuple[str, ...] = (*shifts.CORRUPTIONS, "label-permutation", "spurious", "subpopulation", "none")
"""Target shifts `make_target` builds: input-level corruptions, output-level label permutation or spurious marker,
feature-level subpopulations, or none."""

_DIGITS_SIZE = 32
_DEFAULT_IMAGE_SIZE = 224


def load_digits(image_size: int = _DIGITS_SIZE) -> datasets.Dataset:
    """scikit-learn's handwritten digits (1,797 images, 10 classes) as RGB images of `image_size` pixels.

    The 8x8 images (ink from 0 to 16) are scaled to 0-255 and upsampled bilinearly. Needs scikit-learn, an optional
    extra: `pip install 'surgical-peft[demo]'`.

    Example:
        >>> digits = load_digits()
        >>> digits[0]["image"].size, digits[0]["image"].mode, digits.features["label"].names[:3]
        ((32, 32), 'RGB', ['0', '1', '2'])
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise ImportError("The built-in digits need scikit-learn: pip install 'surgical-peft[demo]'") from error
    bunch = sklearn_digits()
    images = [
        Image.fromarray(np.uint8(np.rint(image * 255 / 16)))
        .resize((image_size, image_size), Image.Resampling.BILINEAR)
        .convert("RGB")
        for image in bunch.images
    ]
    features = datasets.Features(
        image=datasets.Image(), label=datasets.ClassLabel(names=[str(name) for name in bunch.target_names])
    )
    return datasets.Dataset.from_dict({"image": images, "label": bunch.target.tolist()}, features=features)


def _describe_columns(dataset: datasets.Dataset) -> str:
    return ", ".join(f"{name} ({type(feature).__name__})" for name, feature in dataset.features.items())


def _find_column(dataset: datasets.Dataset, column: str | None, kind: type, role: str, argument: str) -> str:
    """`column` if the dataset has it, else the first column whose feature is a `kind`; a `ValueError` otherwise."""
    if column is not None:
        if column not in dataset.column_names:
            raise InputError(
                f"The dataset has no {role} column {column!r}; its columns are: {_describe_columns(dataset)}."
            )
        return column
    found = [name for name, feature in dataset.features.items() if isinstance(feature, kind)]
    if not found:
        raise InputError(
            f"The dataset has no {role} column (a column with the datasets.{kind.__name__} feature); its columns "
            f"are: {_describe_columns(dataset)}. Name the column with {argument}=..."
        )
    return found[0]


def _unreadable_images(dataset: datasets.Dataset, column: str) -> list[tuple[int, str]]:
    """The rows of `column` whose image cannot be decoded, or read as RGB at a known scale (`images.unreadable_mode`),
    with the file (or row) each came from and why."""
    unreadable = []
    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    for row, example in enumerate(raw):
        image = example[column]
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image.get("path")
        try:
            with Image.open(source) as opened:
                opened.load()
                reason = unreadable_mode(opened)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:  # PIL's ways to fail
            reason = type(error).__name__
        if reason is not None:
            unreadable.append((row, f"{image.get('path') or f'row {row}'} ({reason})"))
    return unreadable


def _drop_unreadable(dataset: datasets.Dataset, column: str, skip: bool) -> datasets.Dataset:
    """`dataset` without its unreadable images when `skip`; an `InputError` naming them otherwise."""
    unreadable = _unreadable_images(dataset, column)
    if not unreadable:
        return dataset
    names = ", ".join(name for _, name in unreadable[:5]) + (", ..." if len(unreadable) > 5 else "")
    if not skip:
        raise InputError(
            f"{len(unreadable)} image(s) of the dataset cannot be read: {names}. Remove or fix them (a 32-bit image "
            "is read at a known scale only with values within 0 to 65535, or 0 to 1 for floats: save others as 8- or "
            "16-bit images), or skip them (skip_unreadable=True; on the command line --skip-unreadable-images)."
        )
    warnings.warn(f"Skipping {len(unreadable)} unreadable image(s): {names}.", stacklevel=3)
    bad = {row for row, _ in unreadable}
    return dataset.select([row for row in range(dataset.num_rows) if row not in bad])


def _class_folders(dataset: datasets.Dataset, source: str) -> list[tuple[str, ...]] | None:
    """Each image's path below the folders all of them share (`datasets`' split folder, e.g. `train/`), as parts:
    `("cat", "1.png")` in the `imagefolder` layout; `None` for other datasets than a folder of images alone."""
    if set(dataset.column_names) - {"image", "label"} or "image" not in dataset.column_names:
        return None
    root = Path(source).resolve()
    paths = [image.get("path") for image in dataset.cast_column("image", datasets.Image(decode=False))["image"]]
    if not paths or not all(path and Path(path).resolve().is_relative_to(root) for path in paths):
        return None
    relative = [Path(path).resolve().relative_to(root).parts for path in paths]
    shared = 0  # leading folders every image shares, above the class folders
    while all(len(parts) > shared + 2 for parts in relative) and len({parts[shared] for parts in relative}) == 1:
        shared += 1
    inner = [parts[shared:] for parts in relative]
    return inner if all(len(parts) >= 2 for parts in inner) else None


def _label_by_top_folders(dataset: datasets.Dataset, source: str) -> datasets.Dataset:
    """A folder whose images sit deeper than one folder per class (`cat/left/1.png`, `dog/right/2.png`), labelled by
    its top-level folders (`cat`, `dog`), as torchvision's `ImageFolder` labels it, with a warning naming the layout
    found; any other dataset as it is. (`datasets`' imagefolder names each class after the folder that holds the image,
    `left` and `right` here, and drops the labels of images that sit at different depths.)"""
    inner = _class_folders(dataset, source)
    if inner is None or all(len(parts) == 2 for parts in inner):
        return dataset
    classes = sorted({parts[0] for parts in inner})
    layout = sorted({"/".join(parts[:-1]) for parts in inner if len(parts) > 2})
    warnings.warn(
        f"The images of {source} sit in subfolders of the class folders ({', '.join(layout[:3])}"
        f"{', ...' if len(layout) > 3 else ''}): the classes are the top-level folders, {', '.join(classes[:5])}"
        f"{', ...' if len(classes) > 5 else ''} ({len(classes)} in all), as torchvision's ImageFolder takes them "
        "(datasets' imagefolder would name each class after the innermost folder).",
        stacklevel=3,
    )
    labels = [classes.index(parts[0]) for parts in inner]
    dataset = dataset.remove_columns([name for name in dataset.column_names if name == "label"])
    return dataset.add_column("label", labels, feature=datasets.ClassLabel(names=classes))


def _check_classes(dataset: datasets.Dataset, source: str, label_column: str | None) -> None:
    """A clear error for a dataset of one class (`imagefolder` then gives it no label column at all)."""
    classes = None
    if label_column is None and os.path.isdir(source) and "label" not in dataset.column_names:
        folders = [entry.name for entry in os.scandir(source) if entry.is_dir() and not entry.name.startswith(".")]
        classes = folders if len(folders) == 1 else None
    elif isinstance(dataset.features.get(label_column or "label"), datasets.ClassLabel):
        names = dataset.features[label_column or "label"].names
        classes = names if len(names) < 2 else None
    if classes is not None:
        raise InputError(
            f"The dataset {source!r} has {len(classes)} class ({', '.join(classes) or 'none'}): a classifier needs at "
            "least two. An imagefolder directory holds one folder of images per class."
        )


def load_image_dataset(
    source: str,
    *,
    split: str = "train",
    image_column: str | None = None,
    label_column: str | None = None,
    skip_unreadable: bool = False,
    cache_dir: str | None = None,
) -> datasets.Dataset:
    """Load an image classification dataset as two columns, `image` (`datasets.Image`) and `label` (`ClassLabel`).

    Args:
        source: `"digits"` (built in, offline, see `load_digits`), a Hub dataset id (offline, from the local cache
            with `HF_DATASETS_OFFLINE=1`), or a local directory (`imagefolder` layout: one folder per class, whose
            images may sit in subfolders of it; or anything else `datasets.load_dataset` reads from a directory).
        split: the split to load (`"digits"` has only `"train"`).
        image_column: the image column; default: the first column with the `datasets.Image` feature.
        label_column: the label column; default: the first `ClassLabel` column. A column of integers or strings
            is encoded as a `ClassLabel`.
        skip_unreadable: leave out the images that cannot be decoded (with a warning naming them) instead of
            refusing the dataset. Every image is decoded once to find them (not for the built-in digits).
        cache_dir: where `datasets` caches what it prepares (default: its own cache, `HF_DATASETS_CACHE`).

    Raises:
        ValueError: if the dataset cannot be found, has no image or label column (the message lists its columns),
            has one class, or holds unreadable images (the message names their files); for the built-in digits, a
            column name other than its own.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> root = Path(tempfile.mkdtemp())
        >>> for name in ("cat", "dog"):
        ...     (root / name).mkdir()
        ...     for i in range(2):
        ...         Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / name / f"{i}.png")
        >>> folder = load_image_dataset(str(root))
        >>> folder.features["label"].names, folder.num_rows
        (['cat', 'dog'], 4)
    """
    if source == DIGITS:
        if split != "train":
            raise InputError(f"The built-in {DIGITS!r} dataset has only a 'train' split, not {split!r}.")
        named = {"image_column": (image_column, "image"), "label_column": (label_column, "label")}
        for argument, (column, own) in named.items():
            if column not in (None, own):
                raise InputError(
                    f"{argument}={column!r} does not apply to the built-in {DIGITS!r} dataset, whose columns are "
                    "image and label; it names a column of a Hub or local dataset."
                )
        return load_digits()
    try:
        dataset = datasets.load_dataset(source, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError) as error:  # not on the Hub, not in the offline cache, no directory
        where = "local directory" if os.path.isdir(source) else "Hub dataset (or one in the local cache)"
        raise InputError(
            f"Cannot load dataset {source!r} as a {where}: {error}. Valid sources: a Hub dataset id (cached when "
            f"offline), an imagefolder directory, or {DIGITS!r}."
        ) from error
    if os.path.isdir(source) and label_column is None:
        dataset = _label_by_top_folders(dataset, source)
    _check_classes(dataset, source, label_column)
    image = _find_column(dataset, image_column, datasets.Image, "image", "image_column")
    label = _find_column(dataset, label_column, datasets.ClassLabel, "label", "label_column")
    dataset = dataset.select_columns([image, label])
    if not isinstance(dataset.features[image], datasets.Image):
        raise InputError(f"Column {image!r} must hold images (datasets.Image), got {dataset.features[image]}.")
    dataset = _drop_unreadable(dataset, image, skip_unreadable)
    if not isinstance(dataset.features[label], datasets.ClassLabel):
        dataset = dataset.class_encode_column(label)
    return dataset.rename_columns({old: new for old, new in ((image, "image"), (label, "label")) if old != new})


DEFAULT_TRAIN_N = 200
"""The most labelled target images a run trains on when it is not told how many (`default_train_n`)."""


def default_train_n(rows: int, num_classes: int, eval_n: int | None = None) -> int:
    """How many of `rows` target images train when the number is not given: at most `DEFAULT_TRAIN_N`, leaving
    `eval_n` images for evaluation, or by default a fifth of them and at least one per class (so that any dataset of
    two images per class splits, stratified).

    Example:
        >>> default_train_n(899, 10), default_train_n(123, 3), default_train_n(6, 3), default_train_n(123, 3, eval_n=0)
        (200, 98, 3, 123)
    """
    held = max(num_classes, math.ceil(rows / 5)) if eval_n is None else eval_n
    return max(1, min(DEFAULT_TRAIN_N, rows - held))


def split_target(
    dataset: datasets.Dataset, train_n: int, eval_n: int | None = None, seed: int = 0
) -> datasets.DatasetDict:
    """Split a target dataset into a small labelled `train` set of `train_n` examples and an `eval` set.

    The split is deterministic for a seed and stratified by `label` when both parts can hold every class.

    Args:
        dataset: a dataset with a `ClassLabel` column `label` (as `load_image_dataset` returns).
        train_n: size of the labelled target training set.
        eval_n: size of the evaluation set; default: every other example (at least one); 0: no `eval` split (for a
            caller that only trains or ranks, which may then take every example).
        seed: seed of the split.

    Raises:
        ValueError: if `train_n + eval_n` exceeds the dataset, `train_n` is below 1 or `eval_n` below 0.

    Example:
        >>> from surgical_peft.experiments.data import load_digits
        >>> splits = split_target(load_digits(), train_n=200, seed=0)
        >>> splits["train"].num_rows, splits["eval"].num_rows
        (200, 1597)
        >>> list(split_target(load_digits(), train_n=1797, eval_n=0))
        ['train']
    """
    if train_n < 1 or (eval_n is not None and eval_n < 0):
        raise InputError(f"train_n must be at least 1 and eval_n at least 0, got train_n={train_n}, eval_n={eval_n}.")
    kept = 1 if eval_n is None else eval_n  # the examples evaluation needs at least
    if train_n + kept > dataset.num_rows:
        evaluation = f" (plus eval_n={kept} for evaluation)" if kept else ""
        most = (
            f"train_n can be at most {dataset.num_rows - kept}"
            if dataset.num_rows > kept
            else f"eval_n can be at most {dataset.num_rows - 1}"
        )
        raise InputError(
            f"train_n={train_n}{evaluation} is larger than the target data: it has {dataset.num_rows} examples, so "
            f"{most}."
        )
    rest = dataset.num_rows - train_n
    eval_n = rest if eval_n is None else eval_n
    if rest == 0:
        return datasets.DatasetDict(train=dataset.shuffle(seed=seed))
    num_classes = len(dataset.unique("label"))  # those present (a model's labels may be more)
    stratify = "label" if min(train_n, eval_n or rest) >= num_classes else None
    splits = dataset.train_test_split(
        train_size=train_n, test_size=eval_n or None, seed=seed, stratify_by_column=stratify
    )
    return datasets.DatasetDict(train=splits["train"], **({"eval": splits["test"]} if eval_n else {}))


SOURCE_SHIFTS = ("spurious", "subpopulation")
"""The shifts that define a source and a target half between them (`split_source_target`)."""


def split_source_target(dataset: datasets.Dataset, shift: str = "none", *, seed: int = 0) -> datasets.DatasetDict:
    """Disjoint `source` and `target` halves of `dataset` for a shift (one of `SHIFTS`).

    `spurious` and `subpopulation` define both halves (`shifts.spurious_shift`, `shifts.subpopulation_shift`); every
    other shift splits the dataset into two stratified halves and leaves both clean: `make_target` corrupts or
    relabels the target later, after it has been cut down to the examples it needs.

    Example:
        >>> from surgical_peft.experiments.data import load_digits
        >>> halves = split_source_target(load_digits(), "contrast", seed=0)
        >>> halves["source"].num_rows, halves["target"].num_rows
        (898, 899)
    """
    check_shift(shift)
    if shift == "spurious":
        return shifts.spurious_shift(dataset, seed=seed)
    if shift == "subpopulation":
        return shifts.subpopulation_shift(dataset, seed=seed)
    halves = dataset.train_test_split(test_size=0.5, seed=seed, stratify_by_column="label")
    return datasets.DatasetDict(source=halves["train"], target=halves["test"])


def check_shift(shift: str) -> str:
    """`shift` if it is one of `SHIFTS`; an `InputError` naming the valid ones otherwise.

    Example:
        >>> check_shift("fog")
        'fog'
    """
    if shift not in SHIFTS:
        raise InputError(f"Unknown shift {shift!r}; valid choices: {', '.join(SHIFTS)}.")
    return shift


def _check_unlabeled_n(unlabeled_n: int, rows: int, train_n: int, eval_n: int | None) -> None:
    """An `InputError` unless `unlabeled_n` target images remain after the labelled and the eval images."""
    held = train_n + (1 if eval_n is None else eval_n)  # a default eval split needs at least one image
    if unlabeled_n < 0 or held + unlabeled_n > rows:
        raise InputError(
            f"unlabeled_n={unlabeled_n} must be between 0 and what remains of the target data after the labelled "
            f"split and the eval images: the target has {rows} images, train_n={train_n} and "
            f"eval_n={eval_n if eval_n is not None else 'at least 1'}, so unlabeled_n can be at most "
            f"{max(rows - held, 0)}."
        )


def make_target(
    dataset: datasets.Dataset,
    shift: str,
    *,
    train_n: int | None = None,
    eval_n: int | None = None,
    unlabeled_n: int = 0,
    severity: int = 5,
    seed: int = 0,
    split_source: bool = True,
) -> datasets.DatasetDict:
    """The experiment's splits: a `source` half, and the shifted target half cut into `train` and `eval` (and, with
    `unlabeled_n`, an `unlabeled` split of that many more target images, disjoint from both, for self-training).

    The source half is clean except under `spurious` (markers correlated with the label) and `subpopulation` (its
    own subpopulations), see `split_source_target`. With `split_source=False` there is no source half: the whole
    dataset is the target (your own data, with your own model).

    Args:
        dataset: columns `image` and `label`, as `load_image_dataset` returns.
        shift: one of `SHIFTS`: a corruption name from `shifts.CORRUPTIONS` (applied at `severity`),
            `"label-permutation"`, `"spurious"`, `"subpopulation"` or `"none"`.
        train_n: size of the small labelled target training set; default: `default_train_n` of the target.
        eval_n: size of the target evaluation set; default: the rest of the target; 0: no `eval` split.
        unlabeled_n: size of the `unlabeled` split, cut from the target before `eval` (0: none). Its images keep their
            labels, for scoring pseudo-labels only.
        severity: corruption severity, 1 to 5.
        seed: seeds the halves, the target split and the shift.
        split_source: whether to cut off a source half first; the `SOURCE_SHIFTS` need it.

    Raises:
        ValueError: for an unknown shift, a severity outside 1-5, `train_n` (plus `unlabeled_n`) larger than the
            target data, or a `SOURCE_SHIFTS` shift without `split_source`.

    Example:
        >>> from surgical_peft.experiments.data import load_digits
        >>> splits = make_target(load_digits(), "label-permutation", train_n=100, seed=0)
        >>> {name: split.num_rows for name, split in splits.items()}
        {'source': 898, 'train': 100, 'eval': 799}
        >>> {name: split.num_rows for name, split in make_target(load_digits(), "none", train_n=100,
        ...                                                           split_source=False).items()}
        {'train': 100, 'eval': 1697}
    """
    if not split_source and check_shift(shift) in SOURCE_SHIFTS:
        raise InputError(f"The {shift} shift defines a source and a target half: it needs split_source=True.")
    halves = split_source_target(dataset, shift, seed=seed) if split_source else {"target": dataset}
    if train_n is None:
        rows, num_classes = halves["target"].num_rows - unlabeled_n, len(halves["target"].unique("label"))
        train_n = default_train_n(rows, num_classes, eval_n)
    if unlabeled_n:  # (without it, split_target checks train_n and eval_n)
        _check_unlabeled_n(unlabeled_n, halves["target"].num_rows, train_n, eval_n)
    target = dict(split_target(halves["target"], train_n + unlabeled_n, eval_n, seed=seed))
    if unlabeled_n:
        labelled = split_target(target["train"], train_n, unlabeled_n, seed=seed)
        target.update(train=labelled["train"], unlabeled=labelled["eval"])  # order: train, eval, unlabeled

    def shifted(split: datasets.Dataset, index: int) -> datasets.Dataset:
        if shift in shifts.CORRUPTIONS:
            return shifts.corrupt(split, shift, severity, seed=seed + index)
        if shift == "label-permutation":
            return shifts.permute_labels(split, seed=seed)
        return split  # spurious and subpopulation targets are shifted already; "none" is not

    source = {"source": halves["source"]} if split_source else {}
    return datasets.DatasetDict(
        **source, **{name: shifted(split, index) for index, (name, split) in enumerate(target.items())}
    )


def load_image_processor(model_name_or_path: str) -> Any | None:
    """The model's own image processor (`AutoImageProcessor`), or `None` when it ships without one.

    Example:
        >>> import tempfile
        >>> load_image_processor(tempfile.mkdtemp()) is None
        True
    """
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(model_name_or_path)
    except OSError:  # no preprocessor_config.json in the directory or repository
        return None


def image_transform(
    image_processor: Any | None = None, *, image_size: int | None = None
) -> Callable[[dict[str, list[Any]]], dict[str, Any]]:
    """A batch transform from `{"image", "label"}` to `{"pixel_values", "labels"}` for `Dataset.with_transform`.

    Without an `image_size`, images go through the `image_processor` (its own size); otherwise (or without a
    processor) they are resized to `image_size` square (default 224, bilinear), scaled to [0, 1] and normalised with
    the processor's mean and standard deviation, else ImageNet's, as transformers' processors do.

    Example:
        >>> from PIL import Image
        >>> batch = image_transform(image_size=16)({"image": [Image.new("L", (8, 8))], "label": [3]})
        >>> tuple(batch["pixel_values"].shape), batch["labels"]
        ((1, 3, 16, 16), [3])
    """
    side = image_size or _DEFAULT_IMAGE_SIZE
    mean = torch.tensor(getattr(image_processor, "image_mean", None) or IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", None) or IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def to_tensor(image: Image.Image) -> torch.Tensor:
        resized = image.resize((side, side), Image.Resampling.BILINEAR)
        pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - mean) / std

    def transform(batch: dict[str, list[Any]]) -> dict[str, Any]:
        images = [to_rgb(image) for image in batch["image"]]
        if image_processor is not None and image_size is None:
            pixel_values = image_processor(images=images, return_tensors="pt")["pixel_values"]
        else:
            pixel_values = torch.stack([to_tensor(image) for image in images])
        return {"pixel_values": pixel_values, "labels": list(batch["label"])}

    return transform


def preprocess(
    dataset: datasets.Dataset, image_processor: Any | None = None, *, image_size: int | None = None
) -> datasets.Dataset:
    """`dataset` (columns `image`, `label`) yielding `{"pixel_values": tensor, "labels": int}`, transformed lazily
    (see `image_transform`).

    Example:
        >>> from surgical_peft.experiments.data import load_digits
        >>> sorted(preprocess(load_digits(), image_size=32)[0])
        ['labels', 'pixel_values']
    """
    return dataset.with_transform(image_transform(image_processor, image_size=image_size))
