"""A resumed run is the run it claims to be (issue 26, findings 1-5): its checkpoints record the settings that define
it, its data and Accelerate's settings, so that a rerun with other settings (even with `run_args.json` deleted), other
data, other Accelerate settings or fewer epochs is refused, naming what differs, and leaves everything as it was."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_model
from PIL import Image

from surgical_peft.cli import main
from surgical_peft.errors import InputError
from surgical_peft.training import FineTuneArguments, fine_tune
from surgical_peft.training.checkpoint import latest_checkpoint

TINY = ["--train-n", "30", "--eval-n", "20", "--batch-size", "10", "--no-progress"]


def argv(model: str, output: Path, *extra: str, epochs: int = 1) -> list[str]:
    return ["train", "--model", model, "--block", "stage2", *TINY, "--lr", "0.01", "--epochs", str(epochs),
            "--output-dir", str(output), *extra]  # fmt: skip


def files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def refused(arguments: list[str], output: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """Run `arguments`, which must exit 2 with one line and leave `output` exactly as it was; returns the line."""
    before = files(output)
    capsys.readouterr()
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "Traceback" not in error, error
    assert files(output) == before
    return error


@pytest.fixture
def finished(tiny_model: str, tmp_path: Path) -> Path:
    """A finished 2-epoch run, its run_args.json deleted."""
    output = tmp_path / "run"
    assert main(argv(tiny_model, output, epochs=2)) == 0
    (output / "run_args.json").unlink()
    return output


def test_another_lr_is_refused_without_run_args_json(
    tiny_model: str, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(argv(tiny_model, finished, "--lr", "0.003", epochs=3), finished, capsys)
    assert "holds checkpoints of another run" in error and "--lr 0.01 there, 0.003 now" in error
    assert "delete" in error and "--output-dir" in error


def test_another_block_is_named_as_a_changed_setting_not_damage(
    tiny_model: str, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    arguments = argv(tiny_model, finished, epochs=3)
    arguments[arguments.index("stage2")] = "stage1"
    error = refused(arguments, finished, capsys)
    assert "--block stage2 there, stage1 now" in error and "damaged" not in error and "read back" not in error


def test_a_finished_run_cannot_be_shortened_and_its_card_metrics_and_adapter_agree(
    tiny_model: str, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    error = refused(argv(tiny_model, finished, epochs=1), finished, capsys)
    assert "has trained 2 epoch(s)" in error and "2 epoch(s) of fine-tune trained, 1 asked for now" in error
    assert "--epochs" in error and "start over" in error
    assert main(argv(tiny_model, finished, epochs=2)) == 0  # as many: nothing to train, the same adapter
    assert "already complete: 2 epochs" in capsys.readouterr().out
    history = json.loads((finished / "metrics.json").read_text())["history"]
    assert [record["epoch"] for record in history] == [1, 2]
    assert "| epochs | 2 |" in (finished / "adapter" / "README.md").read_text()


def test_a_phase_that_is_over_cannot_change(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    assert main(argv(tiny_model, output, "--strategy", "lp-ft", "--lp-epochs", "1", epochs=1)) == 0
    error = refused(argv(tiny_model, output, "--strategy", "lp-ft", "--lp-epochs", "2", epochs=2), output, capsys)
    assert "linear-probe is over after 1 epoch(s), 2 asked for now" in error


def test_checkpoints_that_record_no_settings_are_refused(
    tiny_model: str, finished: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    progress_file = latest_checkpoint(finished)[0] / "progress.json"
    progress = json.loads(progress_file.read_text())
    del progress["identity"]  # as an earlier version wrote it
    progress_file.write_text(json.dumps(progress))
    error = refused(argv(tiny_model, finished, epochs=3), finished, capsys)
    assert "record no settings" in error


def test_mixed_precision_from_the_environment_is_refused_naming_where_it_came_from(
    tiny_model: str, finished: Path
) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(ACCELERATE_MIXED_PRECISION="bf16", OMP_NUM_THREADS="1")
    before = files(finished)
    result = subprocess.run(
        [sys.executable, "-m", "surgical_peft.cli", *argv(tiny_model, finished, epochs=3)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Accelerate's mixed_precision no there, bf16 now" in result.stderr
    assert "ACCELERATE_MIXED_PRECISION=bf16 in the environment" in result.stderr
    assert files(finished) == before


def image_folder(root: Path, count: int = 12) -> str:
    for index, label in enumerate(("cat", "dog")):
        (root / label).mkdir(parents=True, exist_ok=True)
        for row in range(count):
            Image.new("RGB", (16, 16), (40 + 150 * index, row * 10, 0)).save(root / label / f"{row}.png")
    return str(root)


def test_a_resume_onto_changed_data_is_refused_naming_what_changed(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images, output = tmp_path / "images", tmp_path / "run"
    folder = ["--dataset", image_folder(images), "--train-n", "10", "--eval-n", "6"]
    assert main(argv(tiny_model, output, *folder)) == 0
    for row in range(12, 15):  # 3 more cats
        Image.new("RGB", (16, 16), (0, 0, row)).save(images / "cat" / f"{row}.png")
    Image.new("RGB", (20, 20), (9, 9, 9)).save(images / "dog" / "0.png")  # one dog replaced
    error = refused(argv(tiny_model, output, *folder, epochs=2), output, capsys)
    assert "the data changed since" in error
    assert f"3 images added to {images}/cat (12.png, 13.png, 14.png)" in error
    assert f"1 image changed in {images}/dog (0.png)" in error


def test_the_python_api_refuses_another_runs_checkpoints(tmp_path: Path) -> None:
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": index % 3} for index in range(8)]
    args = FineTuneArguments(blocks=["stage1"], epochs=1, batch_size=4, progress=False, output_dir=str(tmp_path))
    fine_tune(build_model("resnet-basic"), data, None, args)
    other = replace(args, learning_rate=0.5, epochs=2)
    with pytest.raises(InputError, match=r"--lr 0\.001 there, 0\.5 now"):
        fine_tune(build_model("resnet-basic"), data, None, other)
