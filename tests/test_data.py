"""Data loading, target splits, shifts and preprocessing (`surgical_peft.experiments.data`), offline."""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from surgical_peft.experiments.data import (
    SHIFTS,
    image_transform,
    load_digits,
    load_image_dataset,
    load_image_processor,
    make_target,
    preprocess,
    split_source_target,
    split_target,
)


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return load_digits()


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An imagefolder tree: two classes of three 10x10 images each."""
    for label, color in (("cat", (200, 0, 0)), ("dog", (0, 0, 200))):
        (tmp_path / label).mkdir()
        for index in range(3):
            Image.new("RGB", (10, 10), tuple(c + index for c in color)).save(tmp_path / label / f"{index}.png")
    return tmp_path


def test_digits_are_rgb_32px_with_class_labels(digits: datasets.Dataset) -> None:
    assert digits.num_rows == 1797
    assert isinstance(digits.features["image"], datasets.Image)
    assert digits.features["label"].names == [str(digit) for digit in range(10)]
    image = digits[0]["image"]
    assert (image.mode, image.size) == ("RGB", (32, 32))
    assert np.asarray(image).max() > 200  # ink scaled from 0-16 to 0-255
    assert load_image_dataset("digits")[5]["label"] == digits[5]["label"]


def test_imagefolder_columns_are_detected(image_folder: Path) -> None:
    dataset = load_image_dataset(str(image_folder))
    assert dataset.column_names == ["image", "label"]
    assert dataset.features["label"].names == ["cat", "dog"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 1]


def test_named_columns_are_renamed_and_integer_labels_encoded(tmp_path: Path) -> None:
    images = [Image.new("RGB", (8, 8), (value, value, value)) for value in (0, 50, 100, 150)]
    features = datasets.Features(photo=datasets.Image(), kind=datasets.Value("int64"), note=datasets.Value("string"))
    table = datasets.Dataset.from_dict(
        {"photo": images, "kind": [3, 7, 3, 7], "note": list("abcd")}, features=features
    )
    table.to_parquet(str(tmp_path / "data.parquet"))
    dataset = load_image_dataset(str(tmp_path), label_column="kind")
    assert dataset.column_names == ["image", "label"]
    assert isinstance(dataset.features["label"], datasets.ClassLabel)
    assert dataset.features["label"].names == ["3", "7"]


def test_missing_image_column_names_the_columns(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": ["a", "b"], "score": [1, 2]}).to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(ValueError, match=r"no image column .*columns are: text \(Value\), score \(Value\)"):
        load_image_dataset(str(tmp_path))
    with pytest.raises(ValueError, match="no label column"):
        load_image_dataset(str(tmp_path), image_column="text")


def test_unknown_label_column_and_unknown_dataset(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no label column 'species'.*image \(Image\), label \(ClassLabel\)"):
        load_image_dataset(str(image_folder), label_column="species")
    with pytest.raises(ValueError, match=r"Cannot load dataset .*'digits'"):
        load_image_dataset(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_image_dataset("digits", split="test")


def test_split_target_is_deterministic_stratified_and_checks_sizes(digits: datasets.Dataset) -> None:
    first, second = split_target(digits, 100, 50, seed=3), split_target(digits, 100, 50, seed=3)
    assert first["train"]["label"] == second["train"]["label"]
    assert (first["train"].num_rows, first["eval"].num_rows) == (100, 50)
    assert sorted(set(first["train"]["label"])) == list(range(10))  # stratified: every class is there
    assert split_target(digits, 100, 50, seed=4)["train"]["label"] != first["train"]["label"]
    too_large = r"train_n=5000 \(plus eval_n=1 .* it has 1797 examples, so train_n can be at most 1796"
    with pytest.raises(ValueError, match=too_large):
        split_target(digits, 5000)
    with pytest.raises(ValueError, match="at least 1"):
        split_target(digits, 0)
    with pytest.raises(ValueError, match="it has 1797 examples, so eval_n can be at most 1796"):
        split_target(digits, 10, eval_n=10**12)  # the largest train_n would be negative


@pytest.mark.parametrize("shift", ["contrast", "label-permutation", "spurious", "none"])
def test_make_target_shifts_only_the_target(digits: datasets.Dataset, shift: str) -> None:
    splits = make_target(digits, shift, train_n=30, eval_n=20, severity=5, seed=0)
    assert (splits["train"].num_rows, splits["eval"].num_rows) == (30, 20)
    clean_target = split_target(split_source_target(digits, shift, seed=0)["target"], 30, 20, seed=0)["train"]
    pixels = [np.asarray(splits["train"][i]["image"], dtype=float) for i in range(5)]
    clean = [np.asarray(clean_target[i]["image"], dtype=float) for i in range(5)]
    changed_images = any(not np.array_equal(a, b) for a, b in zip(pixels, clean, strict=True))
    changed_labels = splits["train"]["label"] != clean_target["label"]
    assert (changed_images, changed_labels) == (shift == "contrast", shift == "label-permutation")
    if shift == "spurious":  # the marker is in both halves: only its correlation with the label differs
        source = np.asarray(splits["source"][0]["image"], dtype=float)
        assert not np.array_equal(source, np.asarray(digits[0]["image"], dtype=float))


def test_make_target_rejects_bad_shift_and_severity(digits: datasets.Dataset) -> None:
    assert "gaussian_noise" in SHIFTS and "subpopulation" in SHIFTS
    with pytest.raises(ValueError, match="Unknown shift 'snow'; valid choices: gaussian_noise, "):
        make_target(digits, "snow", train_n=10)
    with pytest.raises(ValueError, match="severity must be an int from 1 to 5, got 6"):
        make_target(digits, "fog", train_n=10, eval_n=10, severity=6)


def test_torch_transform_resizes_and_normalises(digits: datasets.Dataset) -> None:
    example = preprocess(digits.select(range(4)), image_size=48)[0]
    assert tuple(example["pixel_values"].shape) == (3, 48, 48)
    assert example["pixel_values"].dtype == torch.float32
    assert example["labels"] == digits[0]["label"]
    black = image_transform(image_size=4)({"image": [Image.new("L", (2, 2))], "label": [0]})["pixel_values"]
    assert torch.allclose(black[0, :, 0, 0], -torch.tensor([0.485 / 0.229, 0.456 / 0.224, 0.406 / 0.225]))


def test_the_models_image_processor_is_used(digits: datasets.Dataset, tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    assert load_image_processor(str(tmp_path)) is None
    ViTImageProcessor(size={"height": 20, "width": 20}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(
        tmp_path
    )
    processor = load_image_processor(str(tmp_path))
    example = preprocess(digits.select(range(2)), processor)[1]
    assert tuple(example["pixel_values"].shape) == (3, 20, 20)
    assert example["pixel_values"].min() >= -1.0 and example["pixel_values"].max() <= 1.0


def test_make_target_without_a_source_half_takes_the_whole_dataset(digits: datasets.Dataset) -> None:
    splits = make_target(digits, "none", train_n=1000, seed=0, split_source=False)
    assert list(splits) == ["train", "eval"] and (splits["train"].num_rows, splits["eval"].num_rows) == (1000, 797)
    assert list(make_target(digits, "none", train_n=1797, eval_n=0, split_source=False)) == ["train"]
    with pytest.raises(ValueError, match="train_n=1798 is larger than the target data: it has 1797 examples"):
        make_target(digits, "none", train_n=1798, eval_n=0, split_source=False)
    with pytest.raises(ValueError, match="The spurious shift defines a source and a target half"):
        make_target(digits, "spurious", train_n=10, split_source=False)
