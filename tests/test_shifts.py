"""`surgical_peft.experiments.shifts` on real images: scikit-learn's 8x8 digits and its two sample photographs."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from sklearn.datasets import load_digits, load_sample_images

from surgical_peft.experiments.shifts import (
    CORRUPTIONS,
    corrupt,
    corrupt_image,
    permute_labels,
    plot_corruption_grid,
    spurious_shift,
    subpopulation_shift,
)

PAPER_CORRUPTIONS = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "motion_blur",
    "contrast",
    "brightness",
    "fog",
    "pixelate",
    "jpeg_compression",
)
RANDOM_CORRUPTIONS = {"gaussian_noise", "shot_noise", "impulse_noise", "motion_blur", "fog"}
DIGIT_FEATURES = Features({"image": ImageFeature(), "label": ClassLabel(num_classes=10), "id": Value("int64")})


def _digit_images(count: int | None = None) -> list[Image.Image]:
    """The first ``count`` digits (all by default), their 0-16 ink scaled to 0-255 and upsampled to 32x32."""
    return [
        Image.fromarray(np.uint8(pixels * 255 / 16)).resize((32, 32), Image.Resampling.BILINEAR)
        for pixels in load_digits().images[:count]
    ]


def _photo_crops(count: int, size: tuple[int, int] = (32, 32)) -> list[Image.Image]:
    photos = load_sample_images().images  # a temple and a flower, 427x640 RGB
    rng = np.random.default_rng(0)
    width, height = size
    crops = []
    for i in range(count):
        photo = photos[i % 2]
        top, left = rng.integers(0, photo.shape[0] - height), rng.integers(0, photo.shape[1] - width)
        crops.append(Image.fromarray(photo[top : top + height, left : left + width]))
    return crops


@pytest.fixture(scope="module")
def digits() -> Dataset:
    """All 1,797 digits as 32x32 grayscale images, with their original row in ``id``."""
    data = load_digits()
    return Dataset.from_dict(
        {"image": _digit_images(), "label": data.target.tolist(), "id": list(range(len(data.target)))},
        features=DIGIT_FEATURES,
    )


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


DIGITS_50, PHOTOS_50 = _digit_images(50), _photo_crops(50)
SAMPLE_IMAGES = {
    "digit L 32x32": _digit_images(1)[0],
    "photo RGB 32x32": _photo_crops(1)[0],
    "photo RGB 45x27": _photo_crops(1, size=(45, 27))[0],
}


def test_corruptions_include_the_paper_set() -> None:
    assert set(PAPER_CORRUPTIONS) <= set(CORRUPTIONS)
    assert len(set(CORRUPTIONS)) == len(CORRUPTIONS)


@pytest.mark.parametrize("sample", SAMPLE_IMAGES)
@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_corrupt_image_changes_image_keeps_format_and_follows_seed(
    corruption: str, severity: int, sample: str
) -> None:
    clean = SAMPLE_IMAGES[sample]
    corrupted = corrupt_image(clean, corruption, severity, seed=3)

    assert (corrupted.mode, corrupted.size) == (clean.mode, clean.size)
    assert not np.array_equal(_pixels(corrupted), _pixels(clean))
    assert corrupted.tobytes() == corrupt_image(clean, corruption, severity, seed=3).tobytes()
    reseeded = corrupt_image(clean, corruption, severity, seed=4)
    assert (reseeded.tobytes() != corrupted.tobytes()) == (corruption in RANDOM_CORRUPTIONS)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_damage_grows_with_severity(corruption: str) -> None:
    for images in (DIGITS_50, PHOTOS_50):
        damage = [
            np.mean(
                [
                    np.abs(_pixels(corrupt_image(im, corruption, s, seed=i)) - _pixels(im)).mean()
                    for i, im in enumerate(images)
                ]
            )
            for s in range(1, 6)
        ]
        steps = np.diff(damage)
        if corruption == "motion_blur":
            # make_cifar_c.py's (radius, sigma) = (6, 2) and (8, 2) give the same kernel: a documented tie.
            assert steps[2] == pytest.approx(0.0, abs=1e-6)
            steps = np.delete(steps, 2)
        assert np.all(steps > 0), damage


def test_corruptions_match_cifar_c_formulas_on_a_flat_image() -> None:
    grey = Image.new("L", (32, 32), 100)
    # Contrast pulls each pixel towards the image mean, which for a flat image is the pixel itself.
    assert _pixels(corrupt_image(grey, "contrast", 5)).max() == 100
    # Brightness adds c to the HSV value: 100 / 255 + 0.3 -> 176.5, rounded.
    assert np.all(_pixels(corrupt_image(grey, "brightness", 5)) == round(100 + 0.3 * 255))
    # Gaussian noise has standard deviation c = 0.10 of the range at severity 5.
    assert _pixels(corrupt_image(grey, "gaussian_noise", 5)).std() == pytest.approx(25.5, rel=0.1)
    # Impulse noise sets a fraction c = 0.07 of the values to 0 or 255.
    noisy = _pixels(corrupt_image(Image.new("RGB", (64, 64), (100, 100, 100)), "impulse_noise", 5))
    assert np.isin(noisy, (0, 255)).mean() == pytest.approx(0.07, abs=0.015)


def test_corrupt_image_keeps_alpha_of_rgba_images() -> None:
    clean = _photo_crops(1)[0].convert("RGBA")
    clean.putalpha(Image.linear_gradient("L").resize(clean.size))
    corrupted = corrupt_image(clean, "fog", 4)
    assert corrupted.mode == "RGBA"
    assert corrupted.getchannel("A").tobytes() == clean.getchannel("A").tobytes()
    assert corrupted.convert("RGB").tobytes() != clean.convert("RGB").tobytes()


def test_corrupt_dataset_is_deterministic_per_example_and_keeps_features(digits: Dataset) -> None:
    digits = digits.select(range(600))
    shifted = corrupt(digits, "motion_blur", severity=2, seed=7)

    assert shifted.features == digits.features
    assert shifted["label"][:] == digits["label"][:] and shifted["id"][:] == digits["id"][:]
    assert all(img.mode == "L" and img.size == (32, 32) for img in shifted["image"][:20])
    images = [img.tobytes() for img in shifted["image"]]
    assert images == [img.tobytes() for img in corrupt(digits, "motion_blur", severity=2, seed=7)["image"]]
    # Each example has its own stream from (seed, index): a prefix that crosses map batches comes out identical...
    prefix = corrupt(digits.select(range(300)), "motion_blur", severity=2, seed=7)
    assert [img.tobytes() for img in prefix["image"]] == images[:300]
    # ...copies of one image at different indices get different blur angles, and so does another seed.
    copies = Dataset.from_dict({"image": [digits["image"][0]] * 30}, features=Features({"image": ImageFeature()}))
    assert len({img.tobytes() for img in corrupt(copies, "motion_blur", severity=2, seed=7)["image"]}) > 10
    reseeded = corrupt(digits.select(range(50)), "motion_blur", severity=2, seed=8)
    assert sum(a.tobytes() != b for a, b in zip(reseeded["image"], images[:50], strict=True)) > 25


def test_corrupt_works_on_rgb_datasets_and_other_image_columns() -> None:
    photos = Dataset.from_dict(
        {"picture": _photo_crops(40), "label": [0, 1] * 20},
        features=Features({"picture": ImageFeature(), "label": ClassLabel(names=["temple", "flower"])}),
    )
    shifted = corrupt(photos, "jpeg_compression", severity=5, image_column="picture")
    assert shifted.features == photos.features
    for before, after in zip(photos["picture"], shifted["picture"], strict=True):
        assert after.mode == "RGB" and after.size == (32, 32)
        assert not np.array_equal(_pixels(before), _pixels(after))


def test_permute_labels_is_a_consistent_derangement(digits: Dataset) -> None:
    permuted = permute_labels(digits, seed=5)
    old, new = np.asarray(digits["label"]), np.asarray(permuted["label"])

    mapping = {int(label): set(new[old == label].tolist()) for label in range(10)}
    assert all(len(targets) == 1 for targets in mapping.values())  # consistent per class
    mapping = {label: targets.pop() for label, targets in mapping.items()}
    assert sorted(mapping.values()) == list(range(10))  # a permutation...
    assert all(mapping[label] != label for label in mapping)  # ...without fixed points
    assert permuted.features == digits.features
    assert np.array_equal(permuted["image"][0], digits["image"][0])
    # Determined by the seed and the ClassLabel alone: a split of the same dataset gets the same mapping.
    assert permute_labels(digits.select(range(100, 130)), seed=5)["label"][:] == permuted["label"][100:130]
    assert len({tuple(permute_labels(digits.select(range(30)), seed=s)["label"][:]) for s in range(6)}) > 1


def test_permute_labels_with_integer_labels_permutes_the_occurring_classes() -> None:
    ds = Dataset.from_dict({"y": [3, 7, 7, 11, 3]})
    permuted = permute_labels(ds, seed=0, label_column="y")["y"][:]
    assert sorted(set(permuted)) == [3, 7, 11]
    assert all(a != b for a, b in zip(ds["y"], permuted, strict=True))


def _marker_class(clean: Image.Image, shifted: Image.Image, num_classes: int) -> int:
    """Decode the class from the marker's clock position: the centroid of the pixels the shift painted."""
    rows, cols = np.nonzero(np.atleast_3d(_pixels(shifted) != _pixels(clean)).any(-1))
    height, width = _pixels(clean).shape[:2]
    angle = math.atan2(rows.mean() + 0.5 - height / 2, cols.mean() + 0.5 - width / 2)
    return round(angle / (2 * math.pi / num_classes)) % num_classes


def test_spurious_shift_marker_tracks_label_in_source_only(digits: Dataset) -> None:
    digits = digits.select(range(1000))
    shifted = spurious_shift(digits, correlation=0.9, seed=1)

    assert isinstance(shifted, DatasetDict) and set(shifted) == {"source", "target"}
    source_ids, target_ids = shifted["source"]["id"][:], shifted["target"]["id"][:]
    assert not set(source_ids) & set(target_ids)
    assert sorted(source_ids + target_ids) == list(range(len(digits)))
    assert source_ids == sorted(source_ids)  # dataset order kept
    per_class = np.bincount(shifted["source"]["label"][:], minlength=10) - np.bincount(
        shifted["target"]["label"][:], minlength=10
    )
    assert np.all(np.abs(per_class) <= 1)  # stratified halves
    clean = digits["image"][:]
    agreement = {}
    for split in ("source", "target"):
        ds = shifted[split]
        assert ds.features == digits.features
        markers = np.array([_marker_class(clean[i], img, 10) for i, img in zip(ds["id"], ds["image"], strict=True)])
        agreement[split] = np.mean(markers == np.asarray(ds["label"]))
    assert agreement["source"] == pytest.approx(0.9, abs=0.04)
    assert agreement["target"] == pytest.approx(0.1, abs=0.04)
    assert spurious_shift(digits, correlation=0.9, seed=1)["target"]["id"][:] == target_ids  # deterministic


@pytest.mark.parametrize(("correlation", "expected"), [(1.0, 1.0), (0.0, 0.0)])
def test_spurious_shift_extreme_correlations(correlation: float, expected: float) -> None:
    images = _photo_crops(40)
    photos = Dataset.from_dict(
        {"image": images, "label": [i % 4 for i in range(40)], "id": list(range(40))},
        features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=4), "id": Value("int64")}),
    )
    source = spurious_shift(photos, correlation=correlation, seed=0)["source"]
    markers = [_marker_class(images[i], img, 4) for i, img in zip(source["id"], source["image"], strict=True)]
    assert np.mean(np.asarray(markers) == np.asarray(source["label"])) == expected


def _class_mean_gap(features: np.ndarray, labels: np.ndarray, in_source: np.ndarray) -> float:
    """Mean over classes of the distance between the source and target means of the class."""
    return float(
        np.mean(
            [
                np.linalg.norm(
                    features[(labels == c) & in_source].mean(0) - features[(labels == c) & ~in_source].mean(0)
                )
                for c in np.unique(labels)
            ]
        )
    )


@pytest.mark.parametrize("num_subpopulations", [2, 3])
def test_subpopulation_shift_by_kmeans_splits_each_class_into_distinct_looking_groups(
    digits: Dataset, num_subpopulations: int
) -> None:
    digits = digits.select(range(1000))
    shifted = subpopulation_shift(digits, num_subpopulations=num_subpopulations, seed=0)

    source_ids, target_ids = shifted["source"]["id"][:], shifted["target"]["id"][:]
    assert not set(source_ids) & set(target_ids)
    assert sorted(source_ids + target_ids) == list(range(len(digits)))
    assert set(shifted["source"]["label"]) == set(shifted["target"]["label"]) == set(range(10))
    assert shifted["source"].features == shifted["target"].features == digits.features
    assert subpopulation_shift(digits, num_subpopulations=num_subpopulations, seed=0)["source"]["id"][:] == source_ids
    # A feature-level shift: within a class, source and target look more different than a random split would.
    features = np.stack([_pixels(img.resize((8, 8), Image.Resampling.BOX)).ravel() for img in digits["image"]])
    labels = np.asarray(digits["label"])
    in_source = np.isin(np.arange(len(digits)), source_ids)
    random_split = np.random.default_rng(0).permutation(in_source)
    assert _class_mean_gap(features, labels, in_source) > 3 * _class_mean_gap(features, labels, random_split)


def test_subpopulation_shift_from_a_column_groups_sorted_values(digits: Dataset) -> None:
    # BREEDS-style: the coarse class "digit < 5" with the digit itself as the subpopulation.
    coarse = digits.cast_column("label", Value("int64")).rename_column("label", "digit")
    coarse = coarse.add_column("coarse", [int(d >= 5) for d in coarse["digit"]])
    shifted = subpopulation_shift(coarse, label_column="coarse", subpopulation_column="digit")
    assert set(shifted["source"]["digit"]) == {0, 1, 2, 5, 6, 7}
    assert set(shifted["target"]["digit"]) == {3, 4, 8, 9}
    assert shifted["source"].num_rows + shifted["target"].num_rows == len(digits)


def _tiny_dataset(labels: list[int]) -> Dataset:
    return Dataset.from_dict(
        {"image": [Image.new("L", (16, 16), 40 * i % 256) for i in range(len(labels))], "label": labels},
        features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=3)}),
    )


@pytest.mark.parametrize("corruption", ["gaussian", "Fog", "snow"])
def test_unknown_corruption_lists_the_choices(corruption: str) -> None:
    with pytest.raises(ValueError, match=repr(corruption)) as error:
        corrupt_image(SAMPLE_IMAGES["digit L 32x32"], corruption, 3)
    assert all(name in str(error.value) for name in CORRUPTIONS)
    with pytest.raises(ValueError, match="jpeg_compression"):
        corrupt(_tiny_dataset([0, 1]), corruption)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.0, "3", True, None])
def test_bad_severity_names_the_range(severity: object) -> None:
    with pytest.raises(ValueError, match=r"1 to 5, got") as error:
        corrupt_image(SAMPLE_IMAGES["digit L 32x32"], "fog", severity)  # type: ignore[arg-type]
    assert repr(severity) in str(error.value)


def test_missing_columns_list_the_dataset_columns() -> None:
    ds = _tiny_dataset([0, 1, 2])
    for call in (
        lambda: corrupt(ds, "fog", image_column="img"),
        lambda: permute_labels(ds, label_column="target"),
        lambda: spurious_shift(ds, image_column="img"),
        lambda: spurious_shift(ds, label_column="target"),
        lambda: subpopulation_shift(ds, label_column="target"),
        lambda: subpopulation_shift(ds, subpopulation_column="breed"),
    ):
        with pytest.raises(ValueError, match=r"not found; the dataset's columns are \['image', 'label'\]"):
            call()


def test_columns_of_the_wrong_type_are_rejected() -> None:
    ds = _tiny_dataset([0, 1, 2]).add_column("name", ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"datasets\.Image"):
        corrupt(ds, "fog", image_column="name")
    with pytest.raises(ValueError, match=r"decode=True\), got Image\(mode=None, decode=False\)"):
        corrupt(ds.cast_column("image", ImageFeature(decode=False)), "fog")
    with pytest.raises(ValueError, match="ClassLabel or an integer Value"):
        permute_labels(ds, label_column="name")
    with pytest.raises(ValueError, match=r"values \[-1\] outside its ClassLabel range 0\.\.2"):
        permute_labels(_tiny_dataset([0, -1, 2]))
    with pytest.raises(ValueError, match="at least 2 classes"):
        permute_labels(Dataset.from_dict({"label": [4, 4]}))


@pytest.mark.parametrize("correlation", [-0.1, 1.5, float("nan")])
def test_bad_correlation_names_the_range(correlation: float) -> None:
    with pytest.raises(ValueError, match=r"correlation must be in \[0, 1\], got"):
        spurious_shift(_tiny_dataset([0, 1, 2, 0]), correlation=correlation)


def test_too_many_classes_for_the_image_size() -> None:
    ds = Dataset.from_dict(
        {"image": [Image.new("L", (4, 4))] * 40, "label": list(range(40))},
        features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=40)}),
    )
    with pytest.raises(ValueError, match="too small for 40 distinct markers"):
        spurious_shift(ds)


@pytest.mark.parametrize(
    ("labels", "num_subpopulations", "message"),
    [
        ([0, 0, 1, 1, 2, 2], 1, r"from 2 to 2 \(the size of the smallest class, 0\), got 1"),
        ([0, 0, 0, 1, 1, 2, 2, 2], 3, r"from 2 to 2 \(the size of the smallest class, 1\), got 3"),
        ([0, 0, 1, 1, 2], 2, r"Class 2 has 1 example; every class needs at least 2"),
    ],
)
def test_bad_num_subpopulations_or_small_class(labels: list[int], num_subpopulations: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        subpopulation_shift(_tiny_dataset(labels), num_subpopulations=num_subpopulations)


def test_too_few_distinct_subpopulation_values() -> None:
    ds = _tiny_dataset([0, 0, 1, 1]).add_column("site", ["a", "b", "c", "c"])
    with pytest.raises(ValueError, match=r"Class 1 has 1 distinct 'site' values \(\['c'\]\)"):
        subpopulation_shift(ds, subpopulation_column="site")


def test_identical_images_cannot_form_subpopulations() -> None:
    ds = Dataset.from_dict(
        {"image": [Image.new("L", (8, 8), 7)] * 4, "label": [0, 0, 1, 1]},
        features=Features({"image": ImageFeature(), "label": ClassLabel(num_classes=2)}),
    )
    with pytest.raises(ValueError, match="too few distinct images"):
        subpopulation_shift(ds)


def test_plot_corruption_grid_writes_a_png(tmp_path) -> None:
    path = plot_corruption_grid(SAMPLE_IMAGES["photo RGB 32x32"], tmp_path / "grid.png", severities=(2, 4))
    assert path == tmp_path / "grid.png"
    with Image.open(path) as png:
        assert png.format == "PNG"
        assert png.height > 2 * png.width  # one row per corruption, three columns
    with pytest.raises(ValueError, match="1 to 5, got 7"):
        plot_corruption_grid(SAMPLE_IMAGES["photo RGB 32x32"], tmp_path / "bad.png", severities=(7,))


def test_plot_corruption_grid_explains_the_missing_extra(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'surgical-peft\[plots\]'"):
        plot_corruption_grid(SAMPLE_IMAGES["digit L 32x32"], tmp_path / "grid.png")
