"""One run at a time in an output directory (issue 26, finding 6): an OS lock (`flock`) on a file inside it, held
for the run; a second `train` there is refused at once, naming the first one's process id; a run that dies holds
nothing. Real processes, stopped and killed at chosen points by `kill_driver.py`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from surgical_peft.cli import main
from surgical_peft.files import LOCK_FILE, locked_directory

DRIVER = Path(__file__).with_name("kill_driver.py")


def train_argv(model: str, output: Path, lr: str) -> list[str]:
    return ["train", "--model", model, "--block", "stage2", "--train-n", "30", "--eval-n", "20", "--batch-size", "10",
            "--no-progress", "--epochs", "1", "--lr", lr, "--output-dir", str(output)]  # fmt: skip


def start(argv: list[str], **kill: str) -> subprocess.Popen[str]:
    """The command line in a process that stops or kills itself as `kill` says (see kill_driver.py)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", **kill)
    command = [sys.executable, str(DRIVER), *argv]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_a_second_run_on_the_same_output_dir_is_refused_naming_the_first(tiny_model: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    first = start(train_argv(tiny_model, output, "0.01"), KILL_AFTER_STEPS="1", KILL_SIGNAL="STOP")
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)  # stopped mid-epoch, holding the directory
        assert os.WIFSTOPPED(status), status
        second = subprocess.run(
            [sys.executable, "-m", "surgical_peft.cli", *train_argv(tiny_model, output, "0.02")],
            capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"another process (id {first.pid}) is training there" in second.stderr
        assert second.stderr.count("\n") == 1
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    summary = json.loads((output / "metrics.json").read_text())
    assert summary["lr"] == 0.01 and not (output / LOCK_FILE).exists()  # the first run's, whole; the lock released


def test_a_run_that_dies_holds_nothing(tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run"
    killed = start(train_argv(tiny_model, output, "0.01"), KILL_AFTER_STEPS="1")
    assert killed.wait(timeout=300) == -signal.SIGKILL
    assert (output / LOCK_FILE).read_text() == f"{killed.pid}\n"  # left behind, but no longer locked
    assert main(train_argv(tiny_model, output, "0.01")) == 0
    assert not (output / LOCK_FILE).exists()


def test_locked_directory_names_its_holder_and_removes_the_directory_it_made(tmp_path: Path) -> None:
    target = tmp_path / "a" / "run"
    with locked_directory(target, "training"):
        code = f"from surgical_peft.files import locked_directory\nlocked_directory({str(target)!r}).__enter__()"
        holder = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
        assert f"InputError: {target} is in use: another process (id {os.getpid()}) is writing there" in holder.stderr
    assert not (tmp_path / "a").exists()
