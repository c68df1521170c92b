"""Your own images through `surgical-peft train` and `rank` (`surgical_peft.cli.main`): with your own model or
dataset, the whole dataset is the target and nothing is shifted unless asked; the run says how many images went
where; bad values exit with status 2 and the valid choices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import build_model, save_tiny_model
from PIL import Image

from surgical_peft.cli import main

CLASSES = ("cat", "dog", "owl")
PER_CLASS = 10
TRAIN = ["--block", "stage2", "--epochs", "1", "--batch-size", "10", "--no-progress"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An imagefolder dataset: 3 classes of 10 small PNGs."""
    root = tmp_path_factory.mktemp("images")
    for index, label in enumerate(CLASSES):
        (root / label).mkdir()
        for row in range(PER_CLASS):
            Image.new("RGB", (16, 16), (40 + 90 * index, row * 20, 0)).save(root / label / f"{row}.png")
    return str(root)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ResNet for 3 classes, saved with save_pretrained."""
    return save_tiny_model(tmp_path_factory.mktemp("model"), num_labels=len(CLASSES))


def train(argv: list[str], output: Path, capsys: pytest.CaptureFixture[str]) -> tuple[str, dict]:
    assert main(["train", *argv, *TRAIN, "--output-dir", str(output)]) == 0
    return capsys.readouterr().out, json.loads((output / "metrics.json").read_text())


def test_your_own_images_are_all_target_and_unshifted(
    folder: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, summary = train(["--model", model_dir, "--dataset", folder, "--train-n", "18"], tmp_path / "run", capsys)
    assert f"Data: all 30 images of {folder} are the target (no shift): 18 for training, 12 for evaluation." in out
    assert summary["shift"] == "none" and "severity" not in summary
    assert summary["history"][-1]["eval_accuracy"] is not None


def test_a_corruption_asked_for_is_applied_and_recorded(
    folder: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", model_dir, "--dataset", folder, "--train-n", "20", "--eval-n", "6", "--shift", "fog"]
    out, summary = train(argv, tmp_path / "run", capsys)
    assert "are the target (shift fog at severity 5): 20 for training, 6 for evaluation." in out
    assert (summary["shift"], summary["severity"]) == ("fog", 5)


def test_a_shift_that_defines_two_halves_splits_and_says_why(
    folder: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model", model_dir, "--dataset", folder, "--train-n", "6", "--shift", "spurious"]
    out, summary = train(argv, tmp_path / "run", capsys)
    assert "Data: 30 images of " in out and "because the spurious shift defines a source and a target half" in out
    assert summary["shift"] == "spurious" and "severity" not in summary


def test_your_own_model_on_the_digits_takes_them_all(
    model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_model("resnet-basic", num_labels=10)
    model.config.image_size = 32
    model.save_pretrained(tmp_path / "digits-model")
    argv = ["--model", str(tmp_path / "digits-model"), "--train-n", "30", "--eval-n", "20"]
    out, summary = train(argv, tmp_path / "run", capsys)
    assert "Data: all 1797 images of digits are the target (no shift): 30 for training, 20 for evaluation." in out
    assert summary["shift"] == "none"


def test_rank_takes_every_image_of_your_own_data(
    folder: str, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rank", model_dir, folder, "--train-n", "30", "--num-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Data: all 30 images of {folder} are the target (no shift): 30 for ranking." in out
    assert "best block:" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--train-n", "31"], "train_n=31 is larger than the target data: it has 30 examples, so train_n can be at"),
        (["--shift", "none", "--severity", "3"], "--severity 3 applies to a corruption (gaussian_noise, "),
        (
            ["--shift", "spurious", "--train-n", "20"],
            "The 30 images were split into a source and a target half because",
        ),
    ],
)
def test_rank_refuses_bad_input_naming_its_own_options(
    argv: list[str], message: str, folder: str, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rank", model_dir, folder, *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and "eval_n" not in error, error


@pytest.mark.parametrize("command", ["train", "rank"])
def test_an_unknown_shift_exits_2_with_the_valid_choices(
    command: str, folder: str, model_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", model_dir, "--dataset", folder] if command == "train" else ["rank", model_dir, folder]
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--shift", "snow"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --shift: invalid choice: 'snow'" in error and "gaussian_noise" in error and "none" in error


def test_train_refuses_a_severity_without_corruption_and_writes_nothing(
    folder: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", model_dir, "--dataset", folder, "--severity", "2", "--output-dir", str(tmp_path / "x")]
    assert main(argv) == 2
    assert "--severity 2 applies to a corruption" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_an_empty_evaluation_set_exits_2(folder: str, model_dir: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", model_dir, "--dataset", folder, "--eval-n", "0"])
    assert exit_info.value.code == 2
    assert "argument --eval-n: must be a whole number of at least 1, got '0'" in capsys.readouterr().err


def small_folder(root: Path, per_class: int, side: int = 64, classes: tuple[str, ...] = CLASSES) -> str:
    """An imagefolder of `per_class` images of `side` pixels per class."""
    for index, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for row in range(per_class):
            Image.new("RGB", (side, side), (40 + 90 * index, row * 9 % 255, 0)).save(root / label / f"{row}.png")
    return str(root)


def test_train_with_no_other_option_trains_a_folder_of_two_images_per_class(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The defaults: a fifth of the images (one per class at least) evaluates, and the default block, the head, is an
    adapter even where the head is new (2 default-named labels here, 3 classes)."""
    folder = small_folder(tmp_path / "images", per_class=2)
    model = build_model("resnet-basic", num_labels=2)
    model.save_pretrained(tmp_path / "model")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--model", str(tmp_path / "model"), "--dataset", folder]) == 0
    out = capsys.readouterr().out
    assert (
        f"Data: all 6 images of {folder} are the target (no shift): 3 for training, 3 for evaluation (the default "
        "split: --train-n and --eval-n set it)." in out
    )
    assert "Labels: a new head for the dataset's 3 classes (cat, dog, owl), trained." in out
    adapter = tmp_path / "outputs" / "model-images-none-head-seed0" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["modules_to_save"] == ["classifier"]


@pytest.mark.parametrize("command", ["train", "rank"])
def test_a_123_image_folder_splits_by_default(
    command: str, model_dir: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = small_folder(tmp_path / "images", per_class=41, side=16)
    if command == "train":
        argv = ["train", "--model", model_dir, "--dataset", folder, *TRAIN, "--output-dir", str(tmp_path / "run")]
        split = "98 for training, 25 for evaluation"
    else:
        argv, split = ["rank", model_dir, folder, "--num-batches", "1"], "123 for ranking"
    assert main(argv) == 0
    assert f"are the target (no shift): {split} (the default" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("setup", "size", "source"),
    [
        ("none", 64, "the images' own; the model names none"),  # 64-pixel images are not upscaled
        ("large", 224, "the images are 300 pixels, resized down"),
        ("option", 40, "--image-size"),
        ("config", 32, "the model's config"),
        ("processor", 20, "the model's image processor"),
    ],
)
def test_the_image_size_comes_from_the_option_the_model_or_the_images(
    setup: str, size: int, source: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import ViTImageProcessor

    folder = small_folder(tmp_path / "images", per_class=4, side=300 if setup == "large" else 64)
    model = build_model("resnet-basic", num_labels=3)
    if setup == "config":
        model.config.image_size = 32
    model.save_pretrained(tmp_path / "model")
    if setup == "processor":
        ViTImageProcessor(size={"height": 20, "width": 20}).save_pretrained(tmp_path / "model")
    option = ["--image-size", "40"] if setup == "option" else []
    argv = ["--model", str(tmp_path / "model"), "--dataset", folder, *TRAIN, "--output-dir", str(tmp_path / "run")]
    assert main(["train", *argv, *option]) == 0
    assert f"Image size: {size}x{size} pixels ({source})." in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (summary["image_size"], summary["image_size_source"]) == (size, source)
    assert main(["rank", str(tmp_path / "model"), folder, "--num-batches", "1", *option]) == 0
    assert f"Image size: {size}x{size} pixels ({source})." in capsys.readouterr().out
