"""A tuned BatchNorm layer and batches of one image (issue 26, finding 13): it normalises each channel over the
batch, which one image cannot give where the feature map is 1x1 (torch: 'Expected more than 1 value per channel when
training'). A last batch of one is left out of each epoch, saying so, and resumes stay bit-identical; a training set
or batch size that gives only batches of one is refused, naming the cause and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch

from surgical_peft.cli import main

SMALL = ["--image-size", "8", "--eval-n", "20", "--lr", "0.01", "--no-progress"]  # stage2 of the tiny ResNet: 1x1


def argv(model: str, output: Path, *extra: str, block: str = "stage2") -> list[str]:
    return ["train", "--model", model, "--block", block, *SMALL, "--output-dir", str(output), *extra]


@pytest.mark.parametrize(
    ("extra", "cause", "fix"),
    [
        (["--train-n", "1"], "one training image gives batches of one image", "train on at least 2 images"),
        (["--train-n", "20", "--batch-size", "1"], "batch_size=1 (--batch-size 1) gives", "use batch_size 2 or more"),
    ],
)
def test_only_batches_of_one_are_refused_naming_cause_and_fix(
    extra: list[str], cause: str, fix: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv(tiny_model, tmp_path / "run", *extra), "--epochs", "1"]) == 2
    error = capsys.readouterr().err
    assert cause in error and fix in error and "BatchNorm" in error and error.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_last_batch_of_one_is_left_out_and_resumes_stay_exact(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = ["--train-n", "21", "--batch-size", "10"]
    assert main([*argv(tiny_model, tmp_path / "whole", *odd), "--epochs", "2"]) == 0
    assert "it is left out, so each epoch trains on 20 of the 21 images" in capsys.readouterr().out
    assert main([*argv(tiny_model, tmp_path / "resumed", *odd), "--epochs", "1"]) == 0
    assert main([*argv(tiny_model, tmp_path / "resumed", *odd), "--epochs", "2"]) == 0
    whole, resumed = (
        safetensors.torch.load_file(tmp_path / run / "adapter" / "adapter_model.safetensors")
        for run in ("whole", "resumed")
    )
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[key], resumed[key]) for key in whole)


def test_without_a_tuned_batch_norm_every_image_trains(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--train-n", "1", "--epochs", "1"]
    assert main(argv(tiny_model, tmp_path / "run", *extra, block="head")) == 0
    assert "left out" not in capsys.readouterr().out
