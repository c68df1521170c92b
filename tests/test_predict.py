"""`surgical-peft predict`: every image through every adapter into a CSV, run the way a user runs it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from PIL import Image
from transformers import ResNetConfig, ResNetForImageClassification

import surgical_peft
from surgical_peft import SurgicalConfig
from surgical_peft.cli import main
from surgical_peft.experiments.data import load_image_dataset, preprocess

LABELS = ["dark", "light"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-class model (labels dark, light) saved with save_pretrained, two adapters of it (stage1, head) and an
    imagefolder dataset of both classes."""
    root = tmp_path_factory.mktemp("predict")
    config = ResNetConfig(
        embedding_size=8,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        layer_type="basic",
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={label: index for index, label in enumerate(LABELS)},
        image_size=16,
    )
    torch.manual_seed(0)
    ResNetForImageClassification(config).save_pretrained(root / "model")
    for block in ["stage1", "head"]:
        torch.manual_seed(1)
        base = ResNetForImageClassification.from_pretrained(root / "model")
        surgical_peft.save_adapter(get_peft_model(base, SurgicalConfig(block=block, init_weights=False)), root / block)
    for label, colour in (("dark", 40), ("light", 210)):
        (root / "images" / label).mkdir(parents=True)
        for index in range(5):
            Image.new("RGB", (16, 16), (colour, index * 40, 0)).save(root / "images" / label / f"{index}.png")
    return root


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@torch.no_grad()
def _expected(files: Path, adapter: str) -> list[tuple[str, str]]:
    """The (label, probability) that the adapter alone gives each image of the imagefolder, in its order."""
    model = PeftModel.from_pretrained(ResNetForImageClassification.from_pretrained(files / "model"), files / adapter)
    dataset = preprocess(load_image_dataset(str(files / "images")), image_size=16)
    logits = model.eval()(pixel_values=torch.stack([example["pixel_values"] for example in dataset])).logits
    probabilities, indices = torch.softmax(logits, dim=-1).max(dim=-1)
    return [(LABELS[int(index)], f"{float(p):.4f}") for index, p in zip(indices, probabilities, strict=True)]


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "examples:" in text and "--adapter" in text


def test_predict_writes_a_row_per_image_and_adapter(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = files / "out" / "predictions.csv"
    adapters = [str(files / "stage1"), str(files / "head")]
    arguments = ["predict", "--model", str(files / "model"), "--batch-size", "4", str(files / "images")]
    assert main([*arguments, "--adapter", adapters[0], "--adapter", adapters[1], "--output", str(output)]) == 0
    rows = _read(output)
    assert len(rows) == 20 and list(rows[0]) == ["image", "adapter", "predicted_label", "probability", "true_label"]
    printed = capsys.readouterr().out
    for adapter, block in zip(adapters, ["stage1", "head"], strict=True):
        own = [row for row in rows if row["adapter"] == adapter]
        assert [(row["predicted_label"], row["probability"]) for row in own] == _expected(files, block)
        assert [Path(row["image"]).parent.name for row in own] == [row["true_label"] for row in own]
        correct = sum(row["predicted_label"] == row["true_label"] for row in own)
        assert f"{adapter}: accuracy {correct / 10:.1%} ({correct}/10)" in printed
    assert "Wrote 20 predictions (10 images x 2 adapters)" in printed
    assert sorted(path.name for path in output.parent.iterdir()) == ["predictions.csv"]  # no staging left


def test_image_files_have_no_true_label(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = [str(files / "images" / "light" / "1.png"), str(files / "images" / "dark" / "0.png")]
    output = files / "files.csv"
    arguments = ["predict", "--model", str(files / "model"), "--adapter", str(files / "head"), *images]
    assert main([*arguments, "--output", str(output)]) == 0
    rows = _read(output)
    assert [row["image"] for row in rows] == images and all(row["true_label"] == "" for row in rows)
    assert "accuracy" not in capsys.readouterr().out


def test_output_replaces_a_symlink_never_the_file_it_points_to(files: Path) -> None:
    mine = files / "mine.txt"
    mine.write_text("my own file")
    link = files / "link.csv"
    link.symlink_to(mine)
    arguments = ["predict", "--model", str(files / "model"), "--adapter", str(files / "head"), str(files / "images")]
    assert main([*arguments, "--output", str(link)]) == 0
    assert mine.read_text() == "my own file"
    assert not link.is_symlink() and len(_read(link)) == 10


def test_bad_input_exits_2_and_names_the_problem(
    files: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "predictions.csv"
    output.write_text("kept")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    base = ["predict", "--model", str(files / "model"), "--output", str(output)]
    head, images = ["--adapter", str(files / "head")], str(files / "images")
    cases = {
        "missing adapter": ([*base, "--adapter", str(tmp_path / "missing"), images], "there is no such directory"),
        "same adapter twice": ([*base, *head, *head, images], "names the same adapter more than once"),
        "unreadable image": ([*base, *head, str(broken)], f"Cannot read image {broken}"),
        "files and more": ([*base, *head, str(broken), str(tmp_path / "nothing")], "not files:"),
        "output is a directory": ([*base[:-1], str(tmp_path), *head, images], "is a directory"),
        "not a surgical model": ([*base, "--adapter", str(files / "model"), images], "Cannot load adapter"),
    }
    for arguments, message in cases.values():
        assert main(arguments) == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]  # (after transformers' loading progress bars)
        assert error.startswith("surgical-peft predict: error:") and message in error, error
    assert output.read_text() == "kept"  # nothing written over it
    with pytest.raises(SystemExit) as exit_info:
        main([*base, *head, images, "--batch-size", "0"])
    assert exit_info.value.code == 2


REVISION = "0123456789abcdef0123456789abcdef01234567"


def test_adapter_by_hub_id_offline(files: Path, tmp_path: Path) -> None:
    """An adapter given as a Hub id, read from a pre-filled cache with HF_HUB_OFFLINE=1 (in a fresh process: the
    Hub library reads its environment when imported)."""
    snapshot = tmp_path / "hub" / "models--org--head-adapter" / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for path in (files / "head").iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(REVISION)
    output = tmp_path / "hub.csv"
    arguments = ["predict", "--model", str(files / "model"), "--adapter", "org/head-adapter", str(files / "images")]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    command = (
        f"import sys; from surgical_peft.cli import main; sys.exit(main({[*arguments, '--output', str(output)]!r}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", command], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _read(output)
    assert {row["adapter"] for row in rows} == {"org/head-adapter"}
    assert [(row["predicted_label"], row["probability"]) for row in rows] == _expected(files, "head")
