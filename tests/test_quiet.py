"""Output a user sees: no warning the library's own calls trigger."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn
from transformers import AutoModelForImageClassification

from surgical_peft.cli import main
from surgical_peft.training import FineTuneArguments, fine_tune


def test_fine_tune_does_not_warn_about_gradient_checkpointing(make_model: Callable[..., nn.Module]) -> None:
    # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model call.
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fine_tune(
            make_model("resnet-basic"), data, None, FineTuneArguments(blocks=["stage1"], epochs=1, progress=False)
        )
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_checkpoints_hold_each_tensor_once_without_a_warning(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # A PeftModel's state dict names each tuned tensor twice (the model's name and PEFT's adapter name); Accelerate's
    # save_state dropped one itself, warning "Removed shared tensor ... while saving" at every epoch.
    argv = ["train", "--model", tiny_model, "--block", "stage1", "--train-n", "20", "--eval-n", "10", "--epochs", "2"]
    with caplog.at_level(logging.WARNING):
        assert main([*argv, "--output-dir", str(tmp_path / "run"), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "Removed shared tensor" not in captured.out + captured.err + caplog.text
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    saved = safetensors.torch.load_file(checkpoint / "model.safetensors")
    model = AutoModelForImageClassification.from_pretrained(tiny_model)
    assert len(saved) == len(model.state_dict())  # every tensor once
    tuned = [name for name, _ in model.resnet.encoder.stages[0].named_parameters()]
    assert len([key for key in saved if ".tuned.default." in key]) == len(tuned)  # (under the adapter's names)
