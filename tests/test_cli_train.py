"""`surgical-peft train` and `surgical-peft demo` through `surgical_peft.cli.main`, and bad input to `train`: exit
status 2 with a one-line message, no traceback, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from PIL import Image

import surgical_peft.experiments.demo
from surgical_peft.cli import main
from surgical_peft.errors import TrainingError
from surgical_peft.training import FineTuneArguments, fine_tune
from surgical_peft.training.checkpoint import latest_checkpoint

TINY = ["--train-n", "30", "--eval-n", "20", "--epochs", "1", "--batch-size", "10", "--no-progress"]


def image_folder(root: Path, classes: tuple[str, ...], *, broken: bool = False) -> str:
    """An imagefolder dataset of 12 small images per class (and, if `broken`, one file that is no image)."""
    for index, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for row in range(12):
            Image.new("RGB", (16, 16), (40 + 150 * index, row * 10, 0)).save(root / label / f"{row}.png")
    if broken:
        (root / classes[-1] / "broken.png").write_bytes(b"not an image")
    return str(root)


def test_train_runs_and_resumes_through_main(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    assert f"Adapter: {tmp_path / 'adapter'}" in capsys.readouterr().out
    assert main([*argv, "--epochs", "2"]) == 0  # the same directory: resumes after the first epoch
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert [record["epoch"] for record in summary["history"]] == [1, 2]
    assert summary["lr"] == 0.001 and "command" not in summary  # the run's settings, not the command line's
    assert latest_checkpoint(tmp_path)[1].epochs_done == [2]


def test_a_damaged_checkpoint_is_refused_with_a_message(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    checkpoint = latest_checkpoint(tmp_path)[0]
    damaged = checkpoint / "model.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:20])  # truncated
    capsys.readouterr()
    assert main([*argv, "--epochs", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and str(checkpoint) in error and "cannot be read back" in error


def test_a_damaged_run_args_json_is_rewritten_the_checkpoint_says_what_the_run_is(
    tiny_model: str, tmp_path: Path
) -> None:
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    recorded = (tmp_path / "run_args.json").read_text()
    (tmp_path / "run_args.json").write_text("{not json")
    assert main([*argv, "--epochs", "2"]) == 0  # resumed: run_args.json records, the checkpoint decides
    assert (tmp_path / "run_args.json").read_text() == recorded
    assert latest_checkpoint(tmp_path)[1].epochs_done == [2]


def test_demo_runs_through_main(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(surgical_peft.experiments.demo, "_PRETRAIN_EPOCHS", 1)
        argv = ["demo", "--epochs", "1", "--repeats", "1", "--train-n", "20", "--cache-dir", str(cache)]
        assert main([*argv, "--output-dir", str(tmp_path / "demo")]) == 0
    assert "no fine-tuning" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo" / "results.json").read_text())["accuracy"]


def test_no_progress_hides_the_demo_models_pretraining(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(surgical_peft.experiments.demo, "_PRETRAIN_EPOCHS", 1)
        argv = ["train", "--block", "head", *TINY, "--cache-dir", str(tmp_path / "cache")]
        assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 0
    assert (tmp_path / "cache").is_dir()  # the demo model was pretrained in this run
    assert "epoch" not in capsys.readouterr().err


def test_skip_unreadable_images(tiny_model: str, tmp_path: Path) -> None:
    folder = image_folder(tmp_path / "images", ("dark", "light"), broken=True)
    argv = ["train", "--model", tiny_model, "--dataset", folder, "--shift", "none", "--block", "stage2", *TINY]
    argv += ["--train-n", "6", "--eval-n", "6", "--output-dir", str(tmp_path / "run"), "--skip-unreadable-images"]
    with pytest.warns(UserWarning, match=r"Skipping 1 unreadable image\(s\): .*broken\.png"):
        assert main(argv) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lr", "-0.1"], "learning_rate must be a finite number above 0, got -0.1."),
        (["--lr", "nan"], "learning_rate must be a finite number above 0, got nan."),
        (["--lr", "inf"], "learning_rate must be a finite number above 0, got inf."),
        (["--weight-decay", "-1"], "weight_decay must be a finite number of at least 0, got -1.0."),
        (["--strategy", "lp-ft", "--lp-epochs", "-1"], "lp_epochs must be at least 1, got -1."),
        (["--seed", "-1"], "seed must be between 0 and 4294967295, got -1."),
        (["--output-dir", "FILE"], "is a file, not a directory"),
        (["--output-dir", "FILE/run"], "is a file, not a directory"),
        (["--image-column", "img"], "image_column='img' does not apply to the built-in 'digits' dataset"),
        (["--dataset", "ONE_CLASS"], "has 1 class (cat): a classifier needs at least two"),
        (["--dataset", "BROKEN"], "1 image(s) of the dataset cannot be read: BROKEN/light/broken.png"),
        (["--mixed-precision", "fp16"], "mixed_precision='fp16' needs a GPU: on a CPU, Accelerate trains in float32"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(
    argv: list[str], message: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "fp16" in argv and torch.cuda.is_available():
        pytest.skip("fp16 is refused on a CPU only")
    output, file = tmp_path / "run", tmp_path / "a-file"
    file.write_text("mine")
    replacements = {
        "FILE": str(file),
        "FILE/run": str(file / "run"),
        "ONE_CLASS": image_folder(tmp_path / "one", ("cat",)),
        "BROKEN": image_folder(tmp_path / "broken", ("dark", "light"), broken=True),
    }
    argv = [replacements.get(arg, arg) for arg in argv]
    base = ["train", "--model", tiny_model, "--block", "stage2", "--shift", "none", *TINY, "--output-dir", str(output)]
    assert main([*base, *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("surgical-peft train: error: ") and error.count("\n") == 1, error
    assert message.replace("BROKEN", replacements["BROKEN"]) in error
    assert not output.exists() and file.read_text() == "mine"


def test_a_non_finite_loss_stops_training_and_saves_nothing(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--lr", "1e30", "--output-dir", str(output)]
    assert main(argv) == 2
    assert "error: Training stopped in fine-tune epoch 1/1: the loss is not finite" in capsys.readouterr().err
    assert not (output / "adapter").exists() and latest_checkpoint(output) is None


def test_fine_tune_names_the_step_of_the_first_non_finite_loss(tmp_path: Path) -> None:
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": index % 3} for index in range(8)]
    data[5]["pixel_values"][0, 0, 0] = float("nan")
    args = FineTuneArguments(blocks=["stage1"], epochs=2, batch_size=8, progress=False, output_dir=str(tmp_path))
    with pytest.raises(TrainingError, match=r"fine-tune epoch 1/2: the loss is not finite \(nan or inf\) from step 1"):
        fine_tune(build_model("resnet-basic"), data, None, args)
    assert latest_checkpoint(tmp_path) is None
