"""`surgical-peft train --dry-run`: every check of a run, then the plan (labels, splits, image size, blocks and their
parameters, the adapter's size, whether it would start, resume or find the run complete, where files would go),
and nothing trained or written: no output directory, no model cache, nothing in `datasets`' cache."""

from __future__ import annotations

import re
from pathlib import Path

import datasets
import pytest
from conftest import build_model
from PIL import Image

from surgical_peft.cli import main

CLASSES = ("circles", "squares", "stripes")


@pytest.fixture
def folder(tmp_path: Path) -> str:
    root = tmp_path / "images"
    for index, label in enumerate(CLASSES):
        (root / label).mkdir(parents=True)
        for row in range(5):
            Image.new("RGB", (24, 24), (40 + 90 * index, row * 40, 0)).save(root / label / f"{row}.png")
    return str(root)


@pytest.fixture
def model(tmp_path: Path) -> str:
    """A tiny ResNet whose labels are the folder's classes in another order."""
    names = ("stripes", "circles", "squares")
    labels = {"id2label": dict(enumerate(names)), "label2id": {name: index for index, name in enumerate(names)}}
    build_model("resnet-basic", num_labels=3, **labels).save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


@pytest.fixture
def datasets_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`datasets`' cache, in a directory of the test's own."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


def test_a_dry_run_prints_the_plan_and_writes_nothing(
    folder: str, model: str, datasets_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", folder, "--block", "stage2", "--output-dir", str(output)]
    assert main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    expected = [
        f"Data: all 15 images of {folder} are the target (no shift): 12 for training, 3 for evaluation (the default "
        "split: --train-n and --eval-n set it).",
        "Labels: the dataset's classes are the model's labels in another order: each image trains (and is scored) as "
        "the model's id for its class name: circles -> 1, squares -> 2, stripes -> 0.",
        "Image size: 24x24 pixels (the images' own; the model names none).",
        "Blocks to tune: stage2 (3.7K parameters)",
        f"Would write: {output / 'checkpoints'}/, {output / 'adapter'}/, {output / 'metrics.json'}, "
        f"{output / 'run_args.json'}",
        "Training: 10 epochs from the start",
        "Dry run: nothing was trained or written.",
    ]
    assert all(line in out.splitlines() for line in expected), out
    assert not output.exists() and not datasets_cache.exists() and datasets.is_caching_enabled()

    size = re.search(r"Adapter on disk: (\d+ tensors, [\d.]+ kB) \(adapter_model.safetensors\)", out)[1]
    assert main([*argv, "--epochs", "1", "--no-progress"]) == 0  # the run itself: the card states the same size
    assert f"({size})" in (output / "adapter" / "README.md").read_text()


def test_a_dry_run_says_where_a_run_stands(
    folder: str, model: str, datasets_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    argv = ["train", "--model", model, "--dataset", folder, "--no-progress", "--output-dir", str(output)]
    assert main([*argv, "--epochs", "1"]) == 0
    capsys.readouterr()
    checkpoint = output / "checkpoints" / "checkpoint_0"
    files = sorted(path for path in output.rglob("*"))
    assert main([*argv, "--epochs", "1", "--dry-run"]) == 0
    assert f"Training: already complete (1 epochs in {checkpoint}), nothing to train" in capsys.readouterr().out
    assert main([*argv, "--epochs", "3", "--dry-run"]) == 0
    assert f"Training: would resume from {checkpoint} (epoch 1 of 3)" in capsys.readouterr().out
    assert sorted(path for path in output.rglob("*")) == files


def test_a_dry_run_of_the_built_in_demo_pretrains_nothing(
    datasets_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    cache = tmp_path / "cache"
    assert main(["train", "--block", "stage1", "--train-n", "100", "--cache-dir", str(cache), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "Blocks to tune: stage1 (4.7K parameters)" in out
    assert f"Would pretrain the built-in demo-resnet and cache it in {cache / 'demo-resnet-clean-seed0-r2'}" in out
    assert sorted(path.name for path in tmp_path.iterdir()) == []  # no cache, no outputs/, nothing
