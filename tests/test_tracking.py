"""Experiment tracking (`--report-to`, `FineTuneArguments.report_to`): what TensorBoard and trackio wrote, read."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from accelerate import Accelerator
from torch import nn

from surgical_peft.cli import main
from surgical_peft.training import FineTuneArguments, fine_tune

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def train_argv(model: str, output: Path, epochs: int, *extra: str) -> list[str]:
    argv = ["train", "--model", model, "--block", "stage1", "--train-n", "20", "--eval-n", "10"]
    return [*argv, "--epochs", str(epochs), "--output-dir", str(output), "--no-progress", *extra]


def scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard's event files in `directory` hold, by tag: (step, value), in the order written."""
    events = event_accumulator.EventAccumulator(str(directory))
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def history(output: Path, name: str) -> list[float]:
    """A metric of every epoch in `metrics.json`, in order (the step of the i-th is i)."""
    return [record[name] for record in json.loads((output / "metrics.json").read_text())["history"]]


def steps_and_values(logged: list[tuple[int, float]]) -> tuple[list[int], list[float]]:
    return [step for step, _ in logged], [value for _, value in logged]


def test_tensorboard_logs_the_settings_and_every_epoch_and_a_resumed_run_goes_on(
    tiny_model: str, tmp_path: Path
) -> None:
    output = tmp_path / "run"
    assert main(train_argv(tiny_model, output, 2, "--report-to", "tensorboard")) == 0
    logs = output / "runs" / "surgical-peft"
    found = scalars(logs)
    assert steps_and_values(found["train/loss"]) == ([1, 2], pytest.approx(history(output, "train_loss")))
    assert steps_and_values(found["eval/accuracy"]) == ([1, 2], pytest.approx(history(output, "eval_accuracy")))
    assert steps_and_values(found["train/learning_rate"]) == ([1, 2], pytest.approx([1e-3, 1e-3]))
    (settings_file,) = logs.glob("*/hparams.yml")
    settings = yaml.safe_load(settings_file.read_text())
    assert settings["model"] == tiny_model and settings["dataset"] == "digits"
    assert (settings["strategy"], settings["blocks"], settings["train_examples"]) == ("surgical", "stage1", 20)

    # Resumed with more epochs: the same directory, the steps go on from the checkpoint, none is logged twice.
    assert main(train_argv(tiny_model, output, 3, "--report-to", "tensorboard")) == 0
    found = scalars(logs)
    assert steps_and_values(found["train/loss"]) == ([1, 2, 3], pytest.approx(history(output, "train_loss")))
    assert steps_and_values(found["eval/accuracy"]) == ([1, 2, 3], pytest.approx(history(output, "eval_accuracy")))


# Run in a fresh process: trackio reads TRACKIO_DIR, where it keeps its store, when it is imported.
def test_trackio_logs_to_its_local_store_and_a_resumed_run_goes_on_in_the_same_run(
    tiny_model: str, tmp_path: Path
) -> None:
    pytest.importorskip("trackio")
    store, output = tmp_path / "trackio", tmp_path / "my-run"
    env = {**os.environ, "TRACKIO_DIR": str(store), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for epochs in (1, 2):
        command = [sys.executable, "-m", "surgical_peft.cli", *train_argv(tiny_model, output, epochs)]
        result = subprocess.run(
            [*command, "--report-to", "trackio"], capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path
        )
        assert result.returncode == 0, result.stderr[-3000:]
    with sqlite3.connect(store / "surgical-peft.db") as database:
        rows = database.execute("SELECT run_name, step, metrics FROM metrics ORDER BY step").fetchall()
        (config,) = database.execute("SELECT run_name, config FROM configs").fetchall()
    assert [(name, step) for name, step, _ in rows] == [("my-run", 1), ("my-run", 2)]  # one run, named after it
    metrics = [json.loads(values) for _, _, values in rows]
    assert [m["train/loss"] for m in metrics] == pytest.approx(history(output, "train_loss"))
    assert [m["eval/accuracy"] for m in metrics] == pytest.approx(history(output, "eval_accuracy"))
    settings = json.loads(config[1])
    assert (settings["strategy"], settings["blocks"], settings["model"]) == ("surgical", "stage1", tiny_model)


def test_a_tracker_that_is_not_installed_exits_2_with_the_pip_command(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    assert main(train_argv(tiny_model, tmp_path / "run", 1, "--report-to", "tensorboard", "mlflow")) == 2
    message = capsys.readouterr().err.strip()
    assert (
        message
        == "surgical-peft train: error: report_to: mlflow is not installed: pip install 'surgical-peft[mlflow]'"
    )
    assert main(train_argv(tiny_model, tmp_path / "run", 1, "--report-to", "comet")) == 2
    assert (
        "Unknown report_to 'comet'. Valid: tensorboard, trackio, wandb, mlflow, all, none." in capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_report_to_as_transformers_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    assert FineTuneArguments().report_to == []
    assert FineTuneArguments(report_to="tensorboard").report_to == ["tensorboard"]
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "mlflow", None)
    assert "wandb" not in FineTuneArguments(report_to="all").report_to  # every installed tracker
    with pytest.raises(ValueError, match="'all' and 'none' stand alone"):
        FineTuneArguments(report_to=["all", "tensorboard"])


def test_a_callers_accelerator_brings_its_own_trackers(make_model: Callable[..., nn.Module]) -> None:
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(4)]
    args = FineTuneArguments(blocks=["stage1"], epochs=1, progress=False, report_to="tensorboard")
    with pytest.raises(ValueError, match=r"Accelerator\(log_with=\.\.\.\)"):
        fine_tune(make_model("resnet-basic"), data, None, args, accelerator=Accelerator(cpu=True))
