"""The `surgical-peft` command line: help texts, `blocks`, `rank`, and errors as one line with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from transformers import ResNetConfig, ResNetForImageClassification

from surgical_peft.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny two-class ResNet saved with save_pretrained."""
    path = tmp_path_factory.mktemp("model")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=2)
    ResNetForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An imagefolder dataset: two classes of 12 small images each."""
    root = tmp_path_factory.mktemp("images")
    for label, colour in (("dark", 40), ("light", 210)):
        (root / label).mkdir()
        for index in range(12):
            Image.new("RGB", (16, 16), (colour, index * 10, 0)).save(root / label / f"{index}.png")
    return root


@pytest.mark.parametrize("command", [[], ["blocks"], ["rank"], ["train"], ["demo"]], ids=lambda c: c[0] if c else "-")
def test_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:")
    if command != ["demo"]:  # the demo prints its own options
        assert "examples:" in text or "example:" in text
    if command == ["rank"]:
        assert all(criterion in text for criterion in ("rgn", "snr", "sweep", "--plot"))


def test_blocks_of_a_local_model(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["blocks", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("ResNetForImageClassification: 4 blocks")
    assert [line.split()[0] for line in lines[2:]] == ["embedder", "stage1", "stage2", "head"]


def test_rank_writes_scores_and_plot(
    model_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    scores, plot = tmp_path / "ranking.json", tmp_path / "ranking.png"
    arguments = ["rank", str(model_dir), str(image_folder), "--shift", "none", "--train-n", "8", "--batch-size", "4"]
    assert (
        main([*arguments, "--criterion", "snr", "--image-size", "16", "--json", str(scores), "--plot", str(plot)]) == 0
    )
    output = capsys.readouterr().out
    assert "Auto-SNR" in output and "best block:" in output
    assert [row["block"] for row in json.loads(scores.read_text())["blocks"]] == [
        "embedder",
        "stage1",
        "stage2",
        "head",
    ]
    assert plot.stat().st_size > 0


def test_errors_exit_with_status_2_and_one_line(
    model_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["blocks", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.strip() == (
        f"surgical-peft blocks: error: Cannot load model '{tmp_path / 'missing'}': there is no such directory. Pass a "
        "Hub id (cached when offline), a local directory saved with save_pretrained, or the built-in demo-resnet."
    )
    narrow = tmp_path / "one-label"
    ResNetForImageClassification(
        ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], num_labels=1)
    ).save_pretrained(narrow)
    assert main(["rank", str(narrow), str(image_folder), "--shift", "none", "--train-n", "8"]) == 2
    assert "has 2 classes but the model's head predicts 1" in capsys.readouterr().err
    assert main(["rank", str(model_dir), str(image_folder), "--shift", "none", "--train-n", "100"]) == 2
    assert "train_n" in capsys.readouterr().err
    assert main(["rank", str(model_dir), str(image_folder), "--seed", "-1"]) == 2
    assert "seed must be between 0 and 4294967295, got -1." in capsys.readouterr().err
    assert main(["blocks", str(image_folder / "dark" / "0.png")]) == 2
    assert "0.png': it is a file, not a directory." in capsys.readouterr().err
    rank = ["rank", str(model_dir), str(image_folder)]
    sizes = [[*rank, "--image-size", size] for size in ("0", "10" * 6)]
    for bad in (["nonsense"], [*rank, "--shift", "fire"], ["blocks"], *sizes):
        with pytest.raises(SystemExit) as exit_info:
            main(bad)
        assert exit_info.value.code == 2


def test_console_entry_point_prints_no_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "surgical_peft.cli", "blocks", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "there is no such directory" in result.stderr
