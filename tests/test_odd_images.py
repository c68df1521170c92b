"""Images a folder may hold that PIL's `convert("RGB")` reads wrong (issue 26, findings 11 and 12): 16-bit PNGs,
32-bit integer and float TIFFs are read at their own scale or refused naming the file and its mode, and class folders
with subfolders are labelled by the class folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from surgical_peft.cli import main
from surgical_peft.experiments.data import image_transform, load_image_dataset

GRADIENT = np.add.outer(np.arange(16), np.arange(16)) * 8  # 0 to 240, 31 distinct values


def as_mode(pixels: np.ndarray, mode: str) -> Image.Image:
    """An 8-bit grayscale image's pixels as an image of `mode`, at that mode's full scale."""
    if mode == "I;16":
        return Image.fromarray((pixels * 257).astype(np.uint16))
    if mode == "I":
        return Image.fromarray((pixels * 257).astype(np.int32))
    return Image.fromarray((pixels / 255).astype(np.float32))


def folder(root: Path, mode: str, suffix: str, classes: tuple[str, ...] = ("a", "b")) -> Path:
    """Two classes of 6 images of `mode`, saved as `suffix` files, each a shifted gradient."""
    for index, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for row in range(6):
            image = as_mode(np.clip(GRADIENT + 5 * row + 3 * index, 0, 255), mode)
            image.save(root / label / f"{row}{suffix}")
    return root


@pytest.mark.parametrize(("mode", "suffix"), [("I;16", ".png"), ("I", ".tif"), ("F", ".tif")])
def test_wide_images_are_read_at_their_scale(mode: str, suffix: str, tiny_model: str, tmp_path: Path) -> None:
    images = folder(tmp_path / "images", mode, suffix)
    dataset = load_image_dataset(str(images))
    assert dataset[0]["image"].mode == mode  # as PIL opens the file
    transform = image_transform(image_size=16)
    wide = transform({"image": [dataset[0]["image"]], "label": [0]})["pixel_values"]
    eight_bit = Image.fromarray(np.clip(GRADIENT, 0, 255).astype(np.uint8))  # the same picture, 8-bit
    expected = transform({"image": [eight_bit], "label": [0]})["pixel_values"]
    assert torch.allclose(wide, expected, atol=1e-5)  # not clipped to two values
    argv = ["train", "--model", tiny_model, "--dataset", str(images), "--block", "stage2", "--train-n", "6"]
    assert main([*argv, "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0


def test_a_float_image_out_of_0_to_1_is_refused_naming_the_file_and_mode(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = folder(tmp_path / "images", "F", ".tif")
    Image.fromarray((GRADIENT * 4.0).astype(np.float32)).save(images / "b" / "bright.tif")
    argv = ["train", "--model", tiny_model, "--dataset", str(images), "--block", "stage2", "--train-n", "6"]
    assert main([*argv, "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 2
    error = capsys.readouterr().err
    assert (
        f"{images / 'b' / 'bright.tif'} (mode F (32-bit float) with values from 0 to 960, not within 0 to 1)" in error
    )
    assert not (tmp_path / "run").exists()


def test_class_folders_with_subfolders_are_labelled_by_the_class_folders(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images"
    for label, red in (("cat", 30), ("dog", 220)):
        for side in ("left", "right"):
            (images / label / side).mkdir(parents=True)
            for row in range(4):
                Image.new("RGB", (16, 16), (red, 10 * row, 0)).save(images / label / side / f"{row}.png")
    argv = ["train", "--model", tiny_model, "--dataset", str(images), "--block", "stage2", "--train-n", "8"]
    layout = r"subfolders of the class folders \(cat/left, cat/right, dog/left, \.\.\.\): the classes are .* cat, dog"
    with pytest.warns(UserWarning, match=layout):
        assert main([*argv, "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["labels"] == ["cat", "dog"]
    with pytest.warns(UserWarning, match=layout):
        assert load_image_dataset(str(images)).features["label"].names == ["cat", "dog"]
