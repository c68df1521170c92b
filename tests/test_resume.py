"""Resuming `surgical-peft train` is exact and loses nothing: runs killed for real (a subprocess that SIGKILLs itself
at a chosen point, `kill_driver.py`) and extended runs end bit-identical to the uninterrupted run, and at every
instant at least one complete checkpoint exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import ACCELERATE_LAUNCH

from surgical_peft.cli import main
from surgical_peft.training.checkpoint import latest_checkpoint

DRIVER = Path(__file__).with_name("kill_driver.py")
TWO_PROCESSES = Path(__file__).resolve().parents[1] / "examples" / "accelerate_configs" / "cpu_2proc.yaml"
STEPS_PER_EPOCH = 3  # --train-n 30 --batch-size 10


def train_argv(tiny_model: str, output: Path, *extra: str, epochs: int = 2, batch_size: int = 10) -> list[str]:
    argv = ["train", "--model", tiny_model, "--block", "stage2", "--train-n", "30", "--eval-n", "20"]
    argv += ["--batch-size", str(batch_size), "--lr", "0.01", "--no-progress", "--epochs", str(epochs)]
    return [*argv, "--output-dir", str(output), *extra]


def adapter(output: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(output / "adapter" / "adapter_model.safetensors")


def assert_identical(output: Path, reference: Path) -> None:
    """Every tensor of the adapter bitwise equal, and the same per-epoch history."""
    tensors, expected = adapter(output), adapter(reference)
    assert tensors.keys() == expected.keys()
    differ = [name for name in expected if not torch.equal(tensors[name], expected[name])]
    assert not differ, f"differ from the uninterrupted run: {differ}"
    history = json.loads((output / "metrics.json").read_text())["history"]
    assert history == json.loads((reference / "metrics.json").read_text())["history"]


def run_killed(
    argv: list[str], tmp_path: Path, *, processes: int = 1, **kill: str
) -> subprocess.CompletedProcess[str]:
    """Run the command line in a process (or, under `accelerate launch`, two processes) that kills itself as `kill`
    says (see kill_driver.py)."""
    command = [sys.executable, str(DRIVER)]
    if processes == 2:
        command = [*ACCELERATE_LAUNCH, "--config_file", str(TWO_PROCESSES), str(DRIVER)]
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", **kill)
    return subprocess.run([*command, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)


@pytest.fixture(scope="module")
def reference(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """Uninterrupted two-epoch runs, without and with --cache-features."""
    runs = {}
    for cache in (False, True):
        output = tmp_path_factory.mktemp("reference") / "run"
        assert main(train_argv(tiny_model, output, *(["--cache-features"] if cache else []))) == 0
        runs[cache] = output
    return runs


@pytest.mark.parametrize(
    ("signal", "cache"), [("KILL", False), ("INT", False), ("KILL", True)], ids=["sigkill", "sigint", "sigkill-cache"]
)
def test_a_run_killed_mid_epoch_resumes_bit_identical(
    signal: str, cache: bool, tiny_model: str, reference: dict[bool, Path], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    argv = train_argv(tiny_model, output, *(["--cache-features"] if cache else []))
    killed = run_killed(argv, tmp_path, KILL_AFTER_STEPS=str(STEPS_PER_EPOCH + 2), KILL_SIGNAL=signal)
    assert killed.returncode != 0, killed.stderr[-2000:]
    assert not (output / "adapter").exists()
    checkpoint, progress = latest_checkpoint(output)
    assert (checkpoint.name, progress.epochs_done) == ("checkpoint_0", [1])  # killed in the second epoch

    assert main(argv) == 0  # replays the second epoch from the first epoch's checkpoint
    assert_identical(output, reference[cache])


def test_extending_a_finished_run_gives_the_longer_run(
    tiny_model: str, reference: dict[bool, Path], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    strays = [output / "checkpoints" / name for name in (".DS_Store", "checkpoint_backup/notes.txt")]
    strays.append(output / "checkpoints" / "checkpoint_7" / "notes.txt")  # a checkpoint's name, a user's file
    for stray in strays:  # what a user (or Finder) leaves there is ignored and kept
        stray.parent.mkdir(parents=True, exist_ok=True)
        stray.write_text("mine")
    with pytest.warns(UserWarning, match=r"checkpoint_7 holds files no checkpoint writes \(notes\.txt\): left alone"):
        assert main(train_argv(tiny_model, output, epochs=1)) == 0
        assert main(train_argv(tiny_model, output, epochs=2)) == 0

    assert_identical(output, reference[False])
    assert all(stray.read_text() == "mine" for stray in strays)
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == [
        ".DS_Store",
        "checkpoint_1",
        "checkpoint_7",
        "checkpoint_backup",
    ]


@pytest.mark.parametrize(
    ("kill_at", "call", "left"),
    [
        ("accelerate.checkpointing:save", 4, "checkpoint_0"),  # the second one half-written: weights, no optimizer
        ("surgical_peft.training.checkpoint:_mark_complete", 2, "checkpoint_0"),  # written, not yet marked complete
        ("surgical_peft.training.checkpoint:_remove", 1, "checkpoint_1"),  # complete, the old one not yet deleted
    ],
    ids=["writing", "before-marking", "before-deleting"],
)
def test_a_kill_while_checkpointing_loses_nothing(
    kill_at: str, call: int, left: str, tiny_model: str, reference: dict[bool, Path], tmp_path: Path
) -> None:
    output = tmp_path / "run"
    argv = train_argv(tiny_model, output)
    killed = run_killed(argv, tmp_path, KILL_AT=kill_at, KILL_AT_CALL=str(call))
    assert killed.returncode == -9, killed.stderr[-2000:]
    second = output / "checkpoints" / "checkpoint_1"
    assert second.is_dir()  # the kill came while the second one was being saved
    if kill_at.endswith(":save"):
        assert (second / "model.safetensors").is_file() and not (second / "optimizer.bin").exists()
    assert latest_checkpoint(output)[0].name == left

    assert main(argv) == 0
    assert_identical(output, reference[False])
    assert latest_checkpoint(output)[0].name == "checkpoint_1"


@pytest.mark.parametrize("cache", [False, True], ids=["plain", "cache"])
def test_two_processes_extend_and_resume_bit_identical(cache: bool, tiny_model: str, tmp_path: Path) -> None:
    """A finished 2-process run extended by an epoch, killed in that epoch and resumed, ends as the uninterrupted
    run (the extension used to fail with `Checkpoint directory .../checkpoint_0 (0) already exists`)."""
    extra = ["--cache-features"] if cache else []
    reference, output = tmp_path / "reference", tmp_path / "run"

    def launch(directory: Path, epochs: int, **kill: str) -> subprocess.CompletedProcess[str]:
        argv = train_argv(tiny_model, directory, *extra, epochs=epochs, batch_size=5)  # 3 steps per process and epoch
        return run_killed(argv, tmp_path, processes=2, **kill)

    for result in (launch(reference, 2), launch(output, 1)):
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    killed = launch(output, 2, KILL_AFTER_STEPS="2")  # in the second epoch, which this launch starts
    assert killed.returncode != 0 and latest_checkpoint(output)[1].epochs_done == [1]
    resumed = launch(output, 2)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert json.loads((output / "metrics.json").read_text())["num_processes"] == 2
    assert_identical(output, reference)


@pytest.mark.parametrize("switch", [[], ["--switch-every", "2"]], ids=["every-epoch", "every-2-steps"])
def test_an_alternating_run_killed_mid_schedule_resumes_bit_identical(
    switch: list[str], tiny_model: str, tmp_path: Path
) -> None:
    """Killed in the second epoch: in the head's turn (every epoch), or with the turns of 2 steps crossing the
    epochs (stage2, stage2, head | head, stage2, stage2): the resumed run keeps the one optimizer's state."""
    extra = ["--strategy", "alternate", "--block", "head", *switch]
    reference = tmp_path / "reference"
    assert main(train_argv(tiny_model, reference, *extra)) == 0
    output = tmp_path / "run"
    argv = train_argv(tiny_model, output, *extra)
    killed = run_killed(argv, tmp_path, KILL_AFTER_STEPS=str(STEPS_PER_EPOCH + 2), KILL_SIGNAL="KILL")
    assert killed.returncode != 0, killed.stderr[-2000:]
    checkpoint, progress = latest_checkpoint(output)
    assert (checkpoint.name, progress.phase, progress.epochs_done) == ("checkpoint_0", 0, [1])
    assert main(argv) == 0
    assert_identical(output, reference)
    phases = [record["phase"] for record in json.loads((output / "metrics.json").read_text())["history"]]
    assert phases == (["alternate every 2 steps"] * 2 if switch else ["alternate 1/2", "alternate 2/2"])
