"""A run you can follow (`surgical-peft train`): one line per epoch with the training loss and the eval accuracy,
with or without progress bars; a rerun says where it resumes, or that it is complete; Ctrl-C (a real SIGINT to a real
process, `kill_driver.py`) ends with one line naming the last complete checkpoint and the command that resumes it,
exit status 130 and no traceback."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from surgical_peft.cli import main

DRIVER = Path(__file__).with_name("kill_driver.py")
STEPS_PER_EPOCH = 3  # --train-n 30 --batch-size 10


def train_argv(tiny_model: str, output: Path, epochs: int = 2) -> list[str]:
    argv = ["train", "--model", tiny_model, "--block", "stage2", "--train-n", "30", "--eval-n", "20"]
    return [
        *argv,
        "--batch-size",
        "10",
        "--lr",
        "0.01",
        "--no-progress",
        "--epochs",
        str(epochs),
        "--output-dir",
        str(output),
    ]


def epoch_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.startswith("fine-tune epoch ")]


def test_one_line_per_epoch_then_resuming_then_complete(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    assert main(train_argv(tiny_model, output, epochs=1)) == 0
    history = json.loads((output / "metrics.json").read_text())["history"]
    record = history[0]
    assert epoch_lines(capsys.readouterr().out) == [
        f"fine-tune epoch 1/1: train loss {record['train_loss']:.4f}, eval accuracy {record['eval_accuracy']:.4f}"
    ]

    assert main(train_argv(tiny_model, output, epochs=2)) == 0  # one more epoch
    out = capsys.readouterr().out
    checkpoint = output / "checkpoints" / "checkpoint_0"
    assert f"resuming from checkpoint 0 (epoch 1 of 2): {checkpoint}" in out
    assert [line.split(":")[0] for line in epoch_lines(out)] == ["fine-tune epoch 2/2"]

    assert main(train_argv(tiny_model, output, epochs=2)) == 0  # nothing left
    out = capsys.readouterr().out
    assert f"already complete: 2 epochs, nothing to train ({output / 'checkpoints' / 'checkpoint_1'})" in out
    assert epoch_lines(out) == []


def test_ctrl_c_names_the_last_checkpoint_and_the_command_that_resumes_it(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    argv = train_argv(tiny_model, output)
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", KILL_AFTER_STEPS=str(STEPS_PER_EPOCH + 2), KILL_SIGNAL="INT")  # in epoch 2
    interrupted = subprocess.run(
        [sys.executable, str(DRIVER), *argv], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path
    )
    assert interrupted.returncode == 130, interrupted.stderr[-3000:]
    assert "Traceback" not in interrupted.stderr and "KeyboardInterrupt" not in interrupted.stderr
    command = shlex.join(["surgical-peft", *argv])
    assert interrupted.stderr.splitlines()[-1] == (
        f"surgical-peft train: interrupted: the last complete checkpoint is {output / 'checkpoints' / 'checkpoint_0'} "
        f"(epoch 1 of 2). To resume: {command}"
    )
    assert epoch_lines(interrupted.stdout) == [epoch_lines(interrupted.stdout)[0]]  # epoch 1 only

    resume = shlex.split(interrupted.stderr.splitlines()[-1].split("To resume: ")[1])
    assert main(resume[1:]) == 0  # the command it printed
    out = capsys.readouterr().out
    assert "resuming from checkpoint 0 (epoch 1 of 2)" in out
    assert [record["epoch"] for record in json.loads((output / "metrics.json").read_text())["history"]] == [1, 2]
