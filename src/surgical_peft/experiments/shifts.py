"""Shifted target distributions for surgical fine-tuning experiments.

Lee et al. (ICLR 2023, "Surgical Fine-Tuning Improves Adaptation to Distribution Shifts") show that which block
should be tuned depends on the kind of shift between source and target. This module builds the three kinds they
study from any :class:`datasets.Dataset` with an image column, deterministically from a seed:

* input-level shifts: the CIFAR-10-C / ImageNet-C corruptions of Hendrycks & Dietterich (2019), see :func:`corrupt`;
* feature-level shifts: unseen subpopulations of every class, like Entity-30, see :func:`subpopulation_shift`;
* output-level shifts: permuted classes or a spurious marker, like CelebA, see :func:`permute_labels` and
  :func:`spurious_shift`.

The corruptions are reimplemented with numpy and PIL only. Their parameters per severity are those of
``make_cifar_c.py``; where the originals assume 32x32 images (blur sizes), they are scaled up to larger images.
"""

from __future__ import annotations

import functools
import io
import math
import numbers
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import datasets
import numpy as np
from PIL import Image

from ..errors import InputError
from ..plots import save_figure
from .images import WIDE_MODES, to_rgb

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "corrupt",
    "corrupt_image",
    "permute_labels",
    "plot_corruption_grid",
    "spurious_shift",
    "subpopulation_shift",
]

_REFERENCE_SIZE = 32  # side of the CIFAR images that make_cifar_c.py's blur parameters are tuned for
_MAP_BATCH_SIZE = 256  # examples decoded into memory at once

# A corruption maps a float image of shape (height, width, channels) with values in [0, 1], one severity's
# parameter and a random generator to a float image of the same shape; values are clipped afterwards.
_Corruption = Callable[[np.ndarray, Any, np.random.Generator], np.ndarray]


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Independent random stream for ``seed`` and a key such as an example index or a class position."""
    return np.random.default_rng([seed, *key])


def _to_array(image: Image.Image) -> np.ndarray:
    """An ``L`` or ``RGB`` image as floats in [0, 1] of shape (height, width, channels)."""
    array = np.asarray(image, dtype=np.float64) / 255.0
    return array[..., np.newaxis] if array.ndim == 2 else array


def _to_image(array: np.ndarray) -> Image.Image:
    """Inverse of :func:`_to_array`: clips to [0, 1] and rounds to uint8 (``L`` for one channel, else ``RGB``)."""
    pixels = np.rint(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def _scale(x: np.ndarray) -> float:
    """Factor for the blur sizes, which make_cifar_c.py tunes for 32x32 images: the shorter side over 32.

    It is never below 1: the original kernels are already a few pixels wide, and shrinking them would make some
    severities a no-op (a disk of radius under 1 keeps only its centre pixel).
    """
    return max(1.0, min(x.shape[:2]) / _REFERENCE_SIZE)


def _correlate(x: np.ndarray, kernel: np.ndarray, pad_mode: str) -> np.ndarray:
    """Correlate every channel of ``x`` with a square, odd-sized ``kernel`` (like ``cv2.filter2D``), via FFT.

    The image is padded by the kernel radius with ``numpy.pad``'s ``pad_mode`` and the result cropped back to the
    image size; padding by the radius leaves the circular wrap-around of the FFT outside the crop.
    """
    radius = kernel.shape[0] // 2
    padded = np.pad(x, ((radius, radius), (radius, radius), (0, 0)), mode=pad_mode)
    shape = padded.shape[:2]
    spectrum = np.fft.rfft2(padded, axes=(0, 1)) * np.fft.rfft2(kernel[::-1, ::-1], s=shape)[..., np.newaxis]
    full = np.fft.irfft2(spectrum, s=shape, axes=(0, 1))
    return full[2 * radius :, 2 * radius :]


def _gaussian_noise(x: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(scale=scale, size=x.shape)


def _shot_noise(x: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    # Salt-and-pepper on each value independently, half of each, like skimage's random_noise(mode="s&p").
    u = rng.random(x.shape)
    return np.where(u < amount / 2, 0.0, np.where(u < amount, 1.0, x))


def _defocus_blur(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # An anti-aliased disk: a binary disk of `radius` smoothed by a Gaussian of `alias_blur` over a 3x3 support,
    # as in make_cifar_c.py's disk(). All three are scaled up for images larger than 32x32 (see _scale).
    scale = _scale(x)
    radius, alias_blur = (p * scale for p in params)
    support = max(1, math.ceil(scale))
    half = math.ceil(radius) + support
    offsets = np.arange(-half, half + 1)
    disk = (offsets[:, np.newaxis] ** 2 + offsets[np.newaxis, :] ** 2 <= radius**2).astype(np.float64)
    disk /= disk.sum()
    gauss = np.exp(-(np.arange(-support, support + 1) ** 2) / (2 * alias_blur**2))
    gauss = np.outer(gauss, gauss) / gauss.sum() ** 2
    kernel = _correlate(disk[..., np.newaxis], gauss, "constant")[..., 0]
    return _correlate(x, kernel, "reflect")  # numpy's "reflect" is OpenCV's default BORDER_REFLECT_101


def _motion_blur(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # ImageMagick's MotionBlurImage, which make_cifar_c.py calls through Wand: a one-sided half-Gaussian of `sigma`
    # along a line at a random angle in [-45, 45] degrees, over 2 * ceil(radius) + 1 taps rounded to the pixel grid,
    # with edge pixels repeated outside the image. Radius and sigma are scaled up as in _scale.
    scale = _scale(x)
    radius, sigma = (p * scale for p in params)
    taps = np.arange(2 * math.ceil(radius) + 1)
    weights = np.exp(-(taps**2) / (2 * sigma**2))
    angle = np.deg2rad(rng.uniform(-45, 45))
    half = len(taps) - 1
    rows = half + np.ceil(taps * np.sin(angle) - 0.5).astype(int)
    cols = half + np.ceil(taps * np.cos(angle) - 0.5).astype(int)
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    np.add.at(kernel, (rows, cols), weights / weights.sum())
    return _correlate(x, kernel, "edge")


def _plasma_fractal(size: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """Tileable diamond-square height map of side ``size`` (a power of two) in [0, 1], as make_cifar_c.py's."""
    height = np.zeros((size, size))

    def displaced_mean(total: np.ndarray, wibble: float) -> np.ndarray:
        return total / 4 + wibble * rng.uniform(-wibble, wibble, total.shape)

    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = height[::step, ::step]
        square = corners + np.roll(corners, -1, axis=0)
        height[half::step, half::step] = displaced_mean(square + np.roll(square, -1, axis=1), wibble)
        centres = height[half::step, half::step]
        height[::step, half::step] = displaced_mean(
            centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1), wibble
        )
        height[half::step, ::step] = displaced_mean(
            centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0), wibble
        )
        step = half
        wibble /= decay
    height -= height.min()
    return height / height.max()


def _fog(x: np.ndarray, params: tuple[float, float], rng: np.random.Generator) -> np.ndarray:
    # The plasma map grows to the next power of two >= the image side and is cropped, as make_cifar_c.py (32) and
    # make_imagenet_c.py (256, cropped to 224) do, so its coarsest structure spans the image at any size.
    thickness, decay = params
    height, width = x.shape[:2]
    size = 1 << (max(height, width, 2) - 1).bit_length()
    fog = _plasma_fractal(size, decay, rng)[:height, :width, np.newaxis]
    peak = x.max()
    return (x + thickness * fog) * peak / (peak + thickness)


def _contrast(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(0, 1), keepdims=True)
    return (x - means) * factor + means


def _brightness(x: np.ndarray, shift: float, rng: np.random.Generator) -> np.ndarray:
    # make_cifar_c.py adds `shift` to the HSV value (the channel maximum) and converts back. With hue and saturation
    # fixed every channel is proportional to the value, so that is a rescaling; black pixels (saturation 0) turn grey.
    value = x.max(axis=-1, keepdims=True)
    brighter = np.minimum(value + shift, 1.0)
    return np.where(value > 0, x * brighter / np.where(value > 0, value, 1.0), brighter)


def _pixelate(x: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    image = _to_image(x)
    width, height = image.size
    small = image.resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.Resampling.BOX)
    return _to_array(small.resize((width, height), Image.Resampling.BOX))


def _jpeg_compression(x: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
    buffer = io.BytesIO()
    _to_image(x).save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    return _to_array(Image.open(buffer))


# Severity 1-5 parameters of each corruption, from Hendrycks & Dietterich's make_cifar_c.py.
_SEVERITIES: dict[str, tuple[_Corruption, tuple[Any, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "defocus_blur": (_defocus_blur, ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1))),
    # Severities 3 and 4 blur alike: at sigma 2 the taps that radius 8 adds to radius 6 weigh < 1e-9 in total.
    "motion_blur": (_motion_blur, ((6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5))),
    "fog": (_fog, ((0.2, 3), (0.5, 3), (0.75, 2.5), (1, 2), (1.5, 1.75))),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "jpeg_compression": (_jpeg_compression, (80, 65, 58, 50, 40)),
}
SEVERITIES = range(1, 6)
"""The corruption severities, 1 (mild) to 5 (severe)."""

CORRUPTIONS: tuple[str, ...] = tuple(_SEVERITIES)
"""Names of the available corruptions, in the order of the CIFAR-10-C paper (which has 5 more)."""


def _lookup(corruption: str, severity: int) -> tuple[_Corruption, Any]:
    """The corruption function and its parameter at ``severity``, or a ``ValueError`` naming the valid choices."""
    if corruption not in _SEVERITIES:
        raise InputError(f"Unknown corruption {corruption!r}; valid choices: {', '.join(CORRUPTIONS)}.")
    if not isinstance(severity, numbers.Integral) or isinstance(severity, bool) or severity not in SEVERITIES:
        raise InputError(f"severity must be an int from 1 to {SEVERITIES[-1]}, got {severity!r}.")
    function, parameters = _SEVERITIES[corruption]
    return function, parameters[int(severity) - 1]


def _apply(image: Image.Image, function: _Corruption, parameter: Any, rng: np.random.Generator) -> Image.Image:
    """Corrupt ``image``; other 8-bit modes than ``L`` and ``RGB`` go through ``RGB`` and back, keeping any alpha band;
    16- and 32-bit modes come out as 8-bit ``RGB`` (``images.to_rgb``)."""
    base = image if image.mode in ("L", "RGB") else to_rgb(image)
    result = _to_image(function(_to_array(base), parameter, rng))
    if image.mode == result.mode or image.mode in WIDE_MODES:
        return result
    result = result.convert(image.mode)
    if "A" in image.getbands():
        result.putalpha(image.getchannel("A"))
    return result


def corrupt_image(image: Image.Image, corruption: str, severity: int, seed: int = 0) -> Image.Image:
    """Apply one CIFAR-10-C corruption to one image.

    Args:
        image: The clean image, of any size; ``L`` and ``RGB`` are native, other modes go through ``RGB``.
        corruption: One of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong), with the parameters of Hendrycks & Dietterich's ``make_cifar_c.py``.
        seed: Seeds the randomness of the noises, the motion-blur angle and the fog; the other corruptions are
            deterministic.

    Returns:
        A new image with the same mode and size.

    Raises:
        ValueError: If ``corruption`` or ``severity`` is not one of the valid choices.

    Example:
        >>> from PIL import Image
        >>> noisy = corrupt_image(Image.new("RGB", (32, 32), (120, 60, 200)), "shot_noise", severity=5, seed=1)
        >>> noisy.mode, noisy.size
        ('RGB', (32, 32))
    """
    function, parameter = _lookup(corruption, severity)
    return _apply(image, function, parameter, _rng(seed))


def _require_column(dataset: datasets.Dataset, column: str, role: str) -> None:
    if column not in dataset.column_names:
        raise InputError(f"{role} column {column!r} not found; the dataset's columns are {dataset.column_names}.")


def _require_image_column(dataset: datasets.Dataset, column: str) -> None:
    _require_column(dataset, column, "Image")
    feature = dataset.features[column]
    if not (isinstance(feature, datasets.Image) and feature.decode):
        raise InputError(
            f"Column {column!r} must have the datasets.Image() feature (with decode=True), got {feature}; "
            f"use dataset.cast_column({column!r}, datasets.Image())."
        )


def _labels(dataset: datasets.Dataset, column: str) -> tuple[np.ndarray, np.ndarray]:
    """The label of every example and the sorted classes (all of a ClassLabel's, else those that occur).

    Raises a ``ValueError`` if the column is missing or not integer, a label is outside its ClassLabel (such as -1
    for "unlabelled"), or there are fewer than 2 classes.
    """
    _require_column(dataset, column, "Label")
    feature = dataset.features[column]
    is_integer = isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))
    if not (isinstance(feature, datasets.ClassLabel) or is_integer):
        raise InputError(f"Label column {column!r} must be a ClassLabel or an integer Value, got {feature}.")
    labels = np.asarray(dataset[column], dtype=np.int64)
    classes = np.arange(feature.num_classes) if isinstance(feature, datasets.ClassLabel) else np.unique(labels)
    unknown = np.setdiff1d(labels, classes)
    if unknown.size:
        raise InputError(
            f"Label column {column!r} has values {unknown.tolist()} outside its ClassLabel range "
            f"0..{len(classes) - 1}."
        )
    if len(classes) < 2:
        raise InputError(f"Label column {column!r} needs at least 2 classes, got {classes.tolist()}.")
    return labels, classes


def corrupt(
    dataset: datasets.Dataset,
    corruption: str,
    severity: int = 5,
    *,
    seed: int = 0,
    image_column: str = "image",
) -> datasets.Dataset:
    """Input-level shift: apply a CIFAR-10-C corruption to every image of a dataset.

    Example ``i`` is corrupted with its own random stream derived from ``(seed, i)``, so the result is bit-identical
    for the same arguments whatever the batching, and the first ``n`` examples come out the same as those of
    ``dataset.select(range(n))``. The other columns and all features are kept.

    Args:
        dataset: A dataset whose ``image_column`` has the :class:`datasets.Image` feature.
        corruption: One of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (strong, the default).
        seed: Seed of the per-example random streams.
        image_column: Name of the image column.

    Returns:
        The corrupted dataset.

    Raises:
        ValueError: If ``corruption`` or ``severity`` is invalid, or the image column is missing or not an image.

    Example:
        >>> import datasets
        >>> from PIL import Image
        >>> ds = datasets.Dataset.from_dict(
        ...     {"image": [Image.new("L", (32, 32), 100), Image.new("L", (32, 32), 200)]},
        ...     features=datasets.Features({"image": datasets.Image()}),
        ... )
        >>> foggy = corrupt(ds, "fog", severity=3, seed=0)
        >>> foggy[1]["image"].size, foggy.features == ds.features
        ((32, 32), True)
    """
    function, parameter = _lookup(corruption, severity)
    _require_image_column(dataset, image_column)

    def corrupt_batch(images: list[Image.Image], indices: list[int]) -> dict[str, list[Image.Image]]:
        return {
            image_column: [
                _apply(im, function, parameter, _rng(seed, i)) for im, i in zip(images, indices, strict=True)
            ]
        }

    return dataset.map(
        corrupt_batch,
        batched=True,
        batch_size=_MAP_BATCH_SIZE,
        with_indices=True,
        input_columns=image_column,
        features=dataset.features,
        desc=f"{corruption} (severity {severity})",
    )


def permute_labels(dataset: datasets.Dataset, *, seed: int = 0, label_column: str = "label") -> datasets.Dataset:
    """Output-level shift: relabel every class by a fixed random derangement (no class keeps its label).

    The permutation depends only on ``seed`` and the classes (all of a ``ClassLabel``'s, else the labels that
    occur), so the train and test splits of a ``ClassLabel`` dataset get the same one. The label feature is kept.

    Args:
        dataset: A dataset whose ``label_column`` is a ``ClassLabel`` or an integer ``Value``.
        seed: Seed of the permutation.
        label_column: Name of the label column.

    Returns:
        The relabelled dataset.

    Raises:
        ValueError: If the label column is missing, not integer, or has fewer than 2 classes.

    Example:
        >>> import datasets
        >>> ds = datasets.Dataset.from_dict({"label": [0, 1, 2, 0]})
        >>> permuted = permute_labels(ds, seed=0)["label"]
        >>> [int(a) != int(b) for a, b in zip(ds["label"], permuted)]
        [True, True, True, True]
    """
    _, classes = _labels(dataset, label_column)
    rng = _rng(seed)
    permutation = rng.permutation(len(classes))
    while np.any(permutation == np.arange(len(classes))):  # rejection sampling: uniform over derangements
        permutation = rng.permutation(len(classes))
    targets = classes[permutation]

    def relabel(batch: list[int]) -> dict[str, list[int]]:
        return {label_column: targets[np.searchsorted(classes, batch)].tolist()}

    return dataset.map(
        relabel,
        batched=True,
        input_columns=label_column,
        features=dataset.features,
        desc="Permuting labels",
    )


@functools.lru_cache(maxsize=64)
def _marker_boxes(width: int, height: int, num_classes: int) -> tuple[tuple[int, int, int, int], ...]:
    """The (left, top, right, bottom) box of each class's marker in a ``width`` x ``height`` image.

    Class ``k``'s square sits at angle ``2 * pi * k / num_classes`` on the ellipse inscribed in the image.
    """
    side = max(3, min(width, height) // 6)
    angles = 2 * np.pi * np.arange(num_classes) / num_classes
    lefts = np.rint((width - side) / 2 * (1 + np.cos(angles))).astype(int)
    tops = np.rint((height - side) / 2 * (1 + np.sin(angles))).astype(int)
    boxes = tuple((int(x), int(y), int(x) + side, int(y) + side) for x, y in zip(lefts, tops, strict=True))
    if len(set(boxes)) < num_classes:
        raise InputError(f"Images of {width}x{height} pixels are too small for {num_classes} distinct markers.")
    return boxes


def _paint_markers(dataset: datasets.Dataset, markers: np.ndarray, num_classes: int, column: str) -> datasets.Dataset:
    def paint(images: list[Image.Image], indices: list[int]) -> dict[str, list[Image.Image]]:
        painted = []
        for image, index in zip(images, indices, strict=True):
            left, top, right, bottom = _marker_boxes(*image.size, num_classes)[markers[index]]
            marked = image.copy()
            marked.paste("black", (left, top, right, bottom))
            marked.paste("white", (left + 1, top + 1, right - 1, bottom - 1))
            painted.append(marked)
        return {column: painted}

    return dataset.map(
        paint,
        batched=True,
        batch_size=_MAP_BATCH_SIZE,
        with_indices=True,
        input_columns=column,
        features=dataset.features,
        desc="Painting spurious markers",
    )


def spurious_shift(
    dataset: datasets.Dataset,
    *,
    correlation: float = 0.95,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
) -> datasets.DatasetDict:
    """Output-level shift: a spurious marker that predicts the label in the source but not in the target.

    The dataset is split deterministically into two halves, stratified by class. Every image gets a small white
    square framed in black (so it shows on bright images too), a sixth of the shorter side wide, whose position
    encodes a class: class ``k`` of ``K`` sits at angle ``2 * pi * k / K`` (clockwise from 3 o'clock) on the
    ellipse inscribed in the image. In ``"source"`` the marker shows the example's own class with
    probability ``correlation`` and one of the other classes, uniformly, otherwise; in ``"target"`` it shows a
    uniformly random class, independent of the label (agreeing by chance, ``1 / K``).

    Args:
        dataset: A dataset with an image column and a ``ClassLabel`` or integer label column.
        correlation: Probability that the source marker agrees with the label, in [0, 1].
        seed: Seed of the split and of the markers.
        image_column: Name of the image column.
        label_column: Name of the label column.

    Returns:
        A ``DatasetDict`` with ``"source"`` and ``"target"`` splits, each keeping the dataset's columns and order.

    Raises:
        ValueError: If ``correlation`` is outside [0, 1], a column is missing, there are fewer than 2 classes, or the
            images are too small to place a distinct marker for every class.

    Example:
        >>> import datasets
        >>> from PIL import Image
        >>> ds = datasets.Dataset.from_dict(
        ...     {"image": [Image.new("RGB", (32, 32))] * 8, "label": [0, 1] * 4},
        ...     features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)}),
        ... )
        >>> shifted = spurious_shift(ds, correlation=1.0, seed=0)
        >>> shifted["source"].num_rows, shifted["target"].num_rows
        (4, 4)
    """
    if not 0 <= correlation <= 1:
        raise InputError(f"correlation must be in [0, 1], got {correlation!r}.")
    _require_image_column(dataset, image_column)
    labels, classes = _labels(dataset, label_column)
    class_index = np.searchsorted(classes, labels)
    num_classes = len(classes)
    rng = _rng(seed)
    shuffled = rng.permutation(len(labels))
    by_class = shuffled[np.argsort(class_index[shuffled], kind="stable")]
    source_rows, target_rows = np.sort(by_class[0::2]), np.sort(by_class[1::2])

    agrees = rng.random(len(source_rows)) < correlation
    other = (class_index[source_rows] + rng.integers(1, num_classes, len(source_rows))) % num_classes
    source_markers = np.where(agrees, class_index[source_rows], other)
    target_markers = rng.integers(0, num_classes, len(target_rows))
    return datasets.DatasetDict(
        source=_paint_markers(dataset.select(source_rows), source_markers, num_classes, image_column),
        target=_paint_markers(dataset.select(target_rows), target_markers, num_classes, image_column),
    )


def _pixel_features(dataset: datasets.Dataset, column: str) -> np.ndarray:
    """Every image as RGB downsampled to 8x8, flattened to floats in [0, 1]."""
    return np.stack(
        [
            np.asarray(to_rgb(image).resize((8, 8), Image.Resampling.BOX), dtype=np.float64).ravel() / 255.0
            for batch in dataset.select_columns(column).iter(batch_size=_MAP_BATCH_SIZE)
            for image in batch[column]
        ]
    )


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator, max_iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means from a k-means++ start; clusters are numbered by decreasing size (ties by first centre)."""
    centres = points[[rng.integers(len(points))]]
    for _ in range(1, k):
        nearest = ((points[:, np.newaxis] - centres) ** 2).sum(-1).min(1)
        total = nearest.sum()
        chosen = rng.choice(len(points), p=nearest / total if total > 0 else None)
        centres = np.vstack([centres, points[chosen]])
    assignment = np.full(len(points), -1)
    for _ in range(max_iterations):
        distances = ((points[:, np.newaxis] - centres) ** 2).sum(-1)
        new_assignment = distances.argmin(1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for cluster in range(k):
            members = assignment == cluster
            # An emptied cluster restarts from the point farthest from its nearest centre.
            centres[cluster] = points[members].mean(0) if members.any() else points[distances.min(1).argmax()]
    sizes = np.bincount(assignment, minlength=k)
    if not sizes.all():
        raise InputError(f"Cannot find {k} subpopulations among {len(points)} images: too few distinct images.")
    rank = np.empty(k, dtype=np.int64)
    rank[np.argsort(-sizes, kind="stable")] = np.arange(k)
    return rank[assignment]


def _group_values(values: np.ndarray, k: int, owner: str, column: str) -> np.ndarray:
    """Split the sorted distinct ``values`` into ``k`` contiguous, near-equal groups; the group of every value."""
    distinct, ranks = np.unique(values, return_inverse=True)
    if len(distinct) < k:
        raise InputError(
            f"{owner} has {len(distinct)} distinct {column!r} values ({distinct.tolist()}); "
            f"num_subpopulations={k} needs at least that many."
        )
    return ranks * k // len(distinct)


def subpopulation_shift(
    dataset: datasets.Dataset,
    *,
    num_subpopulations: int = 2,
    seed: int = 0,
    image_column: str = "image",
    label_column: str = "label",
    subpopulation_column: str | None = None,
) -> datasets.DatasetDict:
    """Feature-level shift: the source and target hold different subpopulations of every class.

    Within each class, every example is assigned one of ``num_subpopulations`` subpopulations. With
    ``subpopulation_column`` (e.g. CIFAR-100's fine label under its coarse label, or a BREEDS subclass), the
    distinct values of that column within the class are sorted and split into ``num_subpopulations`` contiguous,
    near-equal groups. Without it, a seeded k-means on the images downsampled to 8x8 RGB splits the class, and the
    clusters are numbered by decreasing size. ``"source"`` holds subpopulation 0 of every class and ``"target"``
    all the others, so both splits have the same label set.

    Args:
        dataset: A dataset with an image column and a ``ClassLabel`` or integer label column.
        num_subpopulations: Subpopulations per class, from 2 to the size of the smallest class.
        seed: Seed of the k-means initialisation (unused with ``subpopulation_column``).
        image_column: Name of the image column.
        label_column: Name of the label column.
        subpopulation_column: Optional column whose values define the subpopulations.

    Returns:
        A ``DatasetDict`` with disjoint ``"source"`` and ``"target"`` splits that cover the dataset, each keeping
        the dataset's columns and order.

    Raises:
        ValueError: If a column is missing, ``num_subpopulations`` is below 2 or above the smallest class size, or a
            class has too few examples (or distinct ``subpopulation_column`` values) to split.

    Example:
        >>> import datasets
        >>> from PIL import Image
        >>> shades = [0, 10, 240, 250]
        >>> ds = datasets.Dataset.from_dict(
        ...     {"image": [Image.new("L", (16, 16), s) for s in shades * 2], "label": [0] * 4 + [1] * 4},
        ...     features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=2)}),
        ... )
        >>> shifted = subpopulation_shift(ds, seed=0)
        >>> sorted(set(shifted["source"]["label"])) == sorted(set(shifted["target"]["label"])) == [0, 1]
        True
    """
    _require_image_column(dataset, image_column)
    labels, _ = _labels(dataset, label_column)
    if subpopulation_column is not None:
        _require_column(dataset, subpopulation_column, "Subpopulation")
    if not isinstance(num_subpopulations, numbers.Integral) or isinstance(num_subpopulations, bool):
        raise InputError(f"num_subpopulations must be an int >= 2, got {num_subpopulations!r}.")
    present, counts = np.unique(labels, return_counts=True)
    smallest = int(counts.argmin())
    if counts[smallest] < 2:
        raise InputError(
            f"Class {present[smallest]} has {counts[smallest]} example; every class needs at least 2 to be split "
            "into subpopulations."
        )
    if not 2 <= num_subpopulations <= counts[smallest]:
        raise InputError(
            f"num_subpopulations must be from 2 to {counts[smallest]} (the size of the smallest class, "
            f"{present[smallest]}), got {num_subpopulations}."
        )

    members_by_class = [np.flatnonzero(labels == label) for label in present]
    if subpopulation_column is None:
        pixels = _pixel_features(dataset, image_column)
        groups = [
            _kmeans(pixels[members], num_subpopulations, _rng(seed, position))
            for position, members in enumerate(members_by_class)
        ]
    else:
        values = np.asarray(dataset[subpopulation_column])
        groups = [
            _group_values(values[members], num_subpopulations, f"Class {label}", subpopulation_column)
            for label, members in zip(present, members_by_class, strict=True)
        ]
    subpopulation = np.empty(len(labels), dtype=np.int64)
    for members, group in zip(members_by_class, groups, strict=True):
        subpopulation[members] = group
    return datasets.DatasetDict(
        source=dataset.select(np.flatnonzero(subpopulation == 0)),
        target=dataset.select(np.flatnonzero(subpopulation != 0)),
    )


def plot_corruption_grid(
    image: Image.Image,
    path: str | os.PathLike[str],
    *,
    severities: Sequence[int] = (1, 3, 5),
    seed: int = 0,
) -> pathlib.Path:
    """Save a PNG grid of every corruption of ``image``: one row per corruption, columns clean then each severity.

    Needs matplotlib, an optional extra: ``pip install 'surgical-peft[plots]'``.

    Args:
        image: The clean image.
        path: Where to write the PNG.
        severities: Severities to show, each from 1 to 5.
        seed: Seed passed to :func:`corrupt_image`.

    Returns:
        ``path`` as a :class:`pathlib.Path`.

    Raises:
        ImportError: If matplotlib is not installed.
        ValueError: If a severity is invalid.

    Example:
        >>> import tempfile
        >>> from PIL import Image
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     plot_corruption_grid(Image.new("L", (32, 32), 90), pathlib.Path(tmp) / "grid.png").stat().st_size > 0
        True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plot_corruption_grid needs matplotlib: pip install 'surgical-peft[plots]'") from error

    titles = ["clean", *(f"severity {severity}" for severity in severities)]
    figure = Figure(figsize=(1.2 * len(titles) + 1.3, 1.2 * len(CORRUPTIONS)), layout="constrained")
    axes = figure.subplots(len(CORRUPTIONS), len(titles), squeeze=False)
    for row, corruption in zip(axes, CORRUPTIONS, strict=True):
        panels = [image, *(corrupt_image(image, corruption, severity, seed=seed) for severity in severities)]
        for ax, panel in zip(row, panels, strict=True):
            ax.imshow(np.asarray(to_rgb(panel)), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].set_ylabel(corruption.replace("_", " "), rotation=0, horizontalalignment="right")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_title(title, fontsize="medium")
    return save_figure(figure, path, dpi=100)
