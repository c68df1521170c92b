"""Labels by name (`surgical_peft.labels`): a dataset whose classes are a model's labels in another order trains the
model's ids for its names, and the saved adapter names every image right; other names are refused with the option
that gives a new head; transformers' default `LABEL_<i>` names take the dataset's; `rank`, `fine_tune` and the model
card follow the same rule."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch
from conftest import build_model
from huggingface_hub import ModelCard
from peft import PeftModel
from PIL import Image, ImageDraw
from transformers import AutoModelForImageClassification

from surgical_peft.cli import main
from surgical_peft.errors import InputError
from surgical_peft.experiments.data import image_transform
from surgical_peft.labels import check_label_names, match_labels
from surgical_peft.training import FineTuneArguments, fine_tune

MODEL_LABELS = ("stripes", "circles", "squares")  # the model's order
COLOURS = {"circles": (220, 30, 30), "squares": (30, 200, 30), "stripes": (30, 30, 220)}
PER_CLASS = 8
SIDE = 16
TRAIN = ["--block", "all", "--epochs", "8", "--lr", "0.02", "--batch-size", "8", "--no-progress"]


def draw(label: str, index: int) -> Image.Image:
    """A small image of `label`: its own colour and shape."""
    image = Image.new("RGB", (SIDE, SIDE), (240, 240, 240))
    pen = ImageDraw.Draw(image)
    offset = index % 4
    if label == "circles":
        pen.ellipse((2 + offset, 2, 12 + offset, 12), fill=COLOURS[label])
    elif label == "squares":
        pen.rectangle((2, 2 + offset, 12, 12 + offset), fill=COLOURS[label])
    else:
        for row in range(0, SIDE, 4):
            pen.rectangle((0, row + offset % 2, SIDE, row + 1 + offset % 2), fill=COLOURS[label])
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder of `circles`, `squares` and `stripes` (sorted: the model's labels in another order)."""
    root = tmp_path_factory.mktemp("shapes")
    for label in COLOURS:
        (root / label).mkdir()
        for index in range(PER_CLASS):
            draw(label, index).save(root / label / f"{index}.png")
    return root


def save_model(path: Path, names: tuple[str, ...] | None) -> str:
    """A tiny ResNet for `len(names)` labels named `names` (`None`: transformers' LABEL_<i>, three of them)."""
    labels = (
        {"id2label": dict(enumerate(names)), "label2id": {name: i for i, name in enumerate(names)}} if names else {}
    )
    build_model("resnet-basic", num_labels=len(names or MODEL_LABELS), **labels).save_pretrained(path)
    return str(path)


def predicted_names(base_dir: str, adapter: Path, folder: Path, **load: object) -> dict[str, list[str]]:
    """Every image's predicted label name, by its folder, from the base reloaded with the saved adapter."""
    base = AutoModelForImageClassification.from_pretrained(base_dir, **load)
    model = PeftModel.from_pretrained(base, adapter).eval()
    transform = image_transform(image_size=SIDE)
    names: dict[str, list[str]] = {}
    for label in COLOURS:
        images = [Image.open(path) for path in sorted((folder / label).iterdir())]
        pixels = transform({"image": images, "label": [0] * len(images)})["pixel_values"]
        with torch.no_grad():
            ids = model(pixel_values=pixels).logits.argmax(-1).tolist()
        names[label] = [model.config.id2label[index] for index in ids]
    return names


def test_a_permuted_folder_trains_the_models_ids_and_every_image_is_named_right(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(tmp_path / "model", MODEL_LABELS)
    output = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", str(folder), *TRAIN, "--output-dir", str(output)]) == 0
    out = capsys.readouterr().out
    assert (
        "Labels: the dataset's classes are the model's labels in another order: each image trains (and is scored) "
        "as the model's id for its class name: circles -> 1, squares -> 2, stripes -> 0." in out
    )
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["labels"] == list(MODEL_LABELS) and summary["metrics"]["eval_accuracy"] == 1.0

    named = predicted_names(model, output / "adapter", folder)
    assert named == {label: [label] * PER_CLASS for label in COLOURS}  # the old count-only match: 0 of 24 right
    assert "Labels (3): stripes, circles, squares." in (output / "adapter" / "README.md").read_text()


def test_other_names_exit_2_naming_both_lists_and_the_new_head_option(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(tmp_path / "model", ("cat", "dog", "owl"))
    output = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", str(folder), *TRAIN, "--output-dir", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and not output.exists()
    assert (
        "The model's labels (cat, dog, owl) are not the dataset's classes (circles, squares, stripes): training "
        "would call each class by another's name. Pass --new-head" in error
    )
    assert main(["rank", model, str(folder), "--num-batches", "1"]) == 2
    assert "The model's labels (cat, dog, owl) are not the dataset's classes" in capsys.readouterr().err


def test_a_new_head_takes_the_folders_names_and_the_card_loads_the_base_with_them(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(tmp_path / "model", ("cat", "dog"))
    output = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", str(folder), "--new-head", *TRAIN, "--output-dir", str(output)]
    assert main(argv) == 0
    assert "Labels: a new head for the dataset's 3 classes (circles, squares, stripes), trained." in (
        capsys.readouterr().out
    )
    card = (output / "adapter" / "README.md").read_text()
    id2label = {0: "circles", 1: "squares", 2: "stripes"}
    assert f"id2label={id2label!r}, ignore_mismatched_sizes=True" in card
    named = predicted_names(model, output / "adapter", folder, id2label=id2label, ignore_mismatched_sizes=True)
    assert named == {label: [label] * PER_CLASS for label in COLOURS}


def test_default_label_names_take_the_folders(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(tmp_path / "model", None)  # LABEL_0, LABEL_1, LABEL_2: the head is kept, the names are taken
    output = tmp_path / "run"
    assert main(["train", "--model", model, "--dataset", str(folder), *TRAIN, "--output-dir", str(output)]) == 0
    assert "it takes the dataset's: circles, squares, stripes." in capsys.readouterr().out
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    card = ModelCard.load(output / "adapter" / "README.md").text
    assert "Labels (3): circles, squares, stripes." in card
    assert "id2label={0: 'circles', 1: 'squares', 2: 'stripes'})" in card


def test_rank_maps_a_permuted_folder_onto_the_models_ids(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = save_model(tmp_path / "model", MODEL_LABELS)
    assert main(["rank", model, str(folder), "--num-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "circles -> 1, squares -> 2, stripes -> 0." in out and "best block:" in out


@pytest.mark.parametrize(
    ("dataset_names", "model_names", "kind"),
    [
        (["a", "b"], {0: "a", 1: "b"}, "same"),
        (["a", "b"], {0: "B", 1: "A"}, "permuted"),  # compared in lower case, as datasets aligns them
        (["a", "c"], {0: "a", 1: "b", 2: "c"}, "subset"),
        (["a", "b"], {0: "LABEL_0", 1: "LABEL_1"}, "renamed"),
        (["a", "b", "c"], {0: "LABEL_0", 1: "LABEL_1"}, "new-head"),
        (["a", "b"], None, "new-head"),
    ],
)
def test_match_labels(dataset_names: list[str], model_names: dict[int, str] | None, kind: str) -> None:
    assert match_labels(dataset_names, model_names).kind == kind
    assert match_labels(dataset_names, model_names, new_head=True).kind == "new-head"


def test_long_lists_are_cut_in_the_message() -> None:
    with pytest.raises(InputError, match=r"\(n0, n1, n2, n3, n4, n5, \.\.\. \(40 in all\)\)"):
        match_labels([f"n{index}" for index in range(40)], {0: "cat", 1: "dog"})


def test_fine_tune_refuses_data_whose_class_names_are_the_models_in_another_order() -> None:
    label2id = {name: index for index, name in enumerate(MODEL_LABELS)}
    model = build_model("resnet-basic", num_labels=3, id2label=dict(enumerate(MODEL_LABELS)), label2id=label2id)
    features = datasets.Features(pixel_values=datasets.Array3D((3, 16, 16), "float32"),
                                 labels=datasets.ClassLabel(names=sorted(MODEL_LABELS)))  # fmt: skip
    data = datasets.Dataset.from_dict(
        {"pixel_values": torch.randn(6, 3, 16, 16).numpy(), "labels": [0, 1, 2] * 2}, features=features
    )
    args = FineTuneArguments(blocks=["stage1"], epochs=1, batch_size=3, progress=False)
    with pytest.raises(InputError, match=r"are the model's labels \(stripes, circles, squares\) in another order"):
        fine_tune(model, data.with_format("torch"), None, args)
    aligned = data.align_labels_with_mapping(model.config.label2id, "labels")  # what the message says to do
    check_label_names(aligned, model.config.id2label)
    assert aligned["labels"] == [1, 2, 0] * 2
    assert fine_tune(model, aligned.with_format("torch"), None, args).metrics["train_loss"] > 0
