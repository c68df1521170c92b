"""`examples/train.py` and the recipe behind it (`surgical_peft.cli.recipe`), and the demo, on tiny models, offline."""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import safetensors.torch
import torch
from conftest import build_model, save_tiny_model
from huggingface_hub import ModelCard
from peft import PeftModel
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification

import surgical_peft.experiments.demo
from surgical_peft.cli.recipe import add_training_arguments, run_training
from surgical_peft.errors import InputError
from surgical_peft.experiments.data import load_digits, make_target, preprocess
from surgical_peft.training import FineTuneArguments, evaluate_accuracy, fine_tune

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
TINY = ["--train-n", "30", "--eval-n", "20", "--epochs", "1", "--batch-size", "10", "--no-progress"]


def parse(*argv: str) -> argparse.Namespace:
    return add_training_arguments(argparse.ArgumentParser()).parse_args(list(argv))


@pytest.mark.parametrize("num_labels", [10, 3], ids=["same-head", "new-head"])
def test_training_saves_an_adapter_that_reproduces_the_metrics(num_labels: int, tmp_path: Path) -> None:
    model_dir = save_tiny_model(tmp_path / "model", num_labels)
    output = tmp_path / "run"
    argv = ["--model", model_dir, "--block", "stage1", "--lr", "0.01", "--shift", "contrast", *TINY]
    summary = run_training(parse(*argv, "--output-dir", str(output)))

    assert sorted(p.name for p in output.iterdir()) == ["adapter", "checkpoints", "metrics.json", "run_args.json"]
    assert json.loads((output / "metrics.json").read_text()) == json.loads(json.dumps(summary))
    assert summary["num_processes"] == 1 and summary["blocks"] == ["stage1"]
    config = json.loads((output / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == (None if num_labels == 10 else ["classifier"])

    card = ModelCard.load(output / "adapter" / "README.md")
    assert card.data.library_name == "peft"
    assert {"surgical-fine-tuning", "block:stage1", "shift:contrast"} <= set(card.data.tags)
    assert "| train_n | 30 |" in card.text

    base = AutoModelForImageClassification.from_pretrained(model_dir, num_labels=10, ignore_mismatched_sizes=True)
    tuned = PeftModel.from_pretrained(base, output / "adapter")
    evaluation = make_target(load_digits(), "contrast", train_n=30, eval_n=20, seed=0, split_source=False)["eval"]
    accuracy = evaluate_accuracy(tuned, DataLoader(preprocess(evaluation, image_size=32), batch_size=20))
    assert accuracy == summary["metrics"]["eval_accuracy"]


def test_a_new_head_trains_along_with_the_tuned_block() -> None:
    """A re-initialised head (`modules_to_save`) is trained with the block, not frozen with the rest."""
    model = build_model("resnet-basic")
    head = model.classifier[1].weight.detach().clone()
    data = [{"pixel_values": torch.randn(3, 16, 16), "labels": index % 3} for index in range(8)]
    args = FineTuneArguments(blocks=["stage1"], epochs=1, batch_size=4, modules_to_save=["classifier"], progress=False)
    tuned = fine_tune(model, data, None, args).model.base_model.model
    assert not torch.equal(tuned.classifier.modules_to_save["default"][1].weight, head)
    assert torch.equal(tuned.classifier.original_module[1].weight, head)


def test_an_interrupted_run_resumes_from_its_last_checkpoint(tiny_model: str, tmp_path: Path) -> None:
    argv = ["--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path)]
    run_training(parse(*argv))
    # Mark the first epoch's record in the checkpoint: it survives only if the rerun resumes instead of redoing it.
    progress_file = tmp_path / "checkpoints" / "checkpoint_0" / "progress.json"
    progress = json.loads(progress_file.read_text())
    progress["history"][0]["marker"] = "from the checkpoint"
    progress_file.write_text(json.dumps(progress))

    summary = run_training(parse(*argv, "--epochs", "2"))
    assert [record["epoch"] for record in summary["history"]] == [1, 2]
    assert summary["history"][0]["marker"] == "from the checkpoint"
    assert "marker" not in summary["history"][1]

    with pytest.raises(InputError, match=r"checkpoints of another run, which cannot be resumed: --lr 0.001 there"):
        run_training(parse(*argv, "--epochs", "3", "--lr", "0.5"))


@pytest.fixture(scope="module")
def no_images(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A local dataset without an image column."""
    path = tmp_path_factory.mktemp("no_images")
    datasets.Dataset.from_dict({"text": ["a", "b"], "label": [0, 1]}).to_parquet(str(path / "data.parquet"))
    return str(path)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--block", "stage9"], r"Unknown block 'stage9' .*Valid blocks: embedder, stage1, stage2, head\."),
        (["--block", "all", "--block", "stage1"], r"blocks=\['all'\] means full fine-tuning; it cannot be combined"),
        (["--train-n", "5000"], r"train_n=5000 .*larger than the target data: it has 1797 examples"),
        (["--epochs", "0"], r"epochs must be at least 1, got 0"),
        (["--dataset", "NO_IMAGES"], r"no image column .*columns are: text \(Value\), label \(Value\)"),
        (["--model", "MISSING"], r"Cannot load model '.*missing': there is no such directory"),
        (["--push-to-hub", "--hub-model-id", "me/not a name"], r"--hub-model-id: Repo id must use alphanumeric"),
    ],
)
def test_bad_input_stops_before_training(
    argv: list[str], message: str, tiny_model: str, no_images: str, tmp_path: Path
) -> None:
    replacements = {"NO_IMAGES": no_images, "MISSING": str(tmp_path / "missing")}
    argv = ["--model", tiny_model, *TINY, *(replacements.get(arg, arg) for arg in argv)]
    with pytest.raises(InputError, match=message):
        run_training(parse(*argv, "--output-dir", str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


def test_unknown_block_of_the_default_model_is_reported_before_pretraining(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"Unknown block 'stage7' .*Valid blocks: embedder, stage1, stage2, stage3"):
        run_training(parse("--block", "stage7", "--cache-dir", str(tmp_path / "cache"), *TINY))
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize(
    ("argv", "messages"),
    [
        (["--shift", "snow"], ["argument --shift: invalid choice: 'snow'", "gaussian_noise", "label-permutation"]),
        (["--severity", "6"], ["argument --severity: invalid choice: 6", "1, 2, 3, 4, 5"]),
    ],
)
def test_bad_choices_exit_with_status_2(
    argv: list[str], messages: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(*argv)
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert all(message in error for message in messages), error


def test_the_script_exits_with_status_2_and_the_message(tiny_model: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    command = [sys.executable, str(TRAIN), "--model", tiny_model, "--block", "nope", "--output-dir", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2, result.stderr
    assert "usage: train.py" in result.stderr
    assert "error: Unknown block 'nope' for ResNetForImageClassification. Valid blocks: embedder," in result.stderr
    assert not output.exists()


def test_the_script_without_arguments_runs_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(surgical_peft.experiments.demo, "demo", lambda: calls.append("demo"))
    monkeypatch.setattr(sys, "argv", [str(TRAIN)])
    runpy.run_path(str(TRAIN), run_name="__main__")
    assert calls == ["demo"]


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache holding the demo's source model, pretrained for one epoch only."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(surgical_peft.experiments.demo, "_PRETRAIN_EPOCHS", 1)
        surgical_peft.experiments.demo.source_model(cache_dir=cache, progress=False)
    return cache


def test_the_source_model_is_cached(demo_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cached source model was pretrained again")

    monkeypatch.setattr(surgical_peft.experiments.demo, "fine_tune", no_training)
    path = surgical_peft.experiments.demo.source_model("contrast", cache_dir=demo_cache)
    assert (path / "config.json").is_file()
    assert AutoModelForImageClassification.from_pretrained(path).config.image_size == 32


def test_the_demo_prints_a_table_and_draws_a_chart(
    demo_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = {"train_n": 20, "val_n": 10, "epochs": 1, "learning_rates": (1e-3, 1e-2), "repeats": 2}
    result = surgical_peft.experiments.demo.demo(**settings, cache_dir=demo_cache, output_dir=tmp_path)
    rows = ["no fine-tuning", "embedder", "stage1", "stage2", "stage3", "stage4", "head", "full"]
    assert list(result.accuracy) == rows
    assert result.best in rows[1:] and result.best == max(rows[1:], key=result.accuracy.get)
    assert set(result.learning_rate.values()) <= {1e-3, 1e-2}
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "results.json").read_text())["accuracy"] == result.accuracy
    table = capsys.readouterr().out
    assert "tuned block" in table and "<- best" in table and "no fine-tuning" in table


def test_the_built_in_demo_keeps_its_split_and_shift(
    demo_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --model, no --dataset: demo-resnet on the target half of the digits, contrast at severity 5."""
    summary = run_training(
        parse("--block", "stage1", "--cache-dir", str(demo_cache), *TINY, "--output-dir", str(tmp_path))
    )
    assert (
        "Data: 1797 images of digits, split into a source half (898) and a target half (899) because demo-resnet, "
        "the built-in demo's model, is pretrained on the source half; target shift contrast at severity 5: 30 for "
        "training, 20 for evaluation." in capsys.readouterr().out
    )
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert (recorded["shift"], recorded["severity"]) == (summary["shift"], summary["severity"]) == ("contrast", 5)


def test_the_source_models_initial_weights_are_its_own() -> None:
    # Drawn per module from the seed and the module's name: not from torch's global RNG, nor in the order a
    # transformers release initialises modules.
    demo = surgical_peft.experiments.demo
    models = []
    for global_seed in (0, 123):
        torch.manual_seed(global_seed)
        model = demo.ResNetForImageClassification(demo.source_config())
        demo._initialise(model, seed=0)
        models.append(model.state_dict())
    assert all(torch.equal(models[0][name], models[1][name]) for name in models[0])
    other = demo.ResNetForImageClassification(demo.source_config())
    demo._initialise(other, seed=1)
    assert not torch.equal(other.classifier[1].weight, models[0]["classifier.1.weight"])  # another seed


PRETRAIN = """
import sys
import surgical_peft.experiments.demo as demo
demo._PRETRAIN_EPOCHS = 2
print(demo.source_model("contrast", cache_dir=sys.argv[1], progress=False))
"""


def test_the_source_model_is_the_same_with_another_cpus_kernels(tmp_path: Path) -> None:
    # Pretrained in float32, the last-bit differences between AVX-512 and AVX2 kernels grew into another model (the
    # demo's head row moved by 16 points); in float64 the saved float32 weights agree. ATEN_CPU_CAPABILITY=avx2 has
    # PyTorch use its AVX2 kernels on an AVX-512 CPU (elsewhere both runs use the same kernels).
    weights = []
    for name, env in (("own", {}), ("avx2", {"ATEN_CPU_CAPABILITY": "avx2"})):
        command = [sys.executable, "-c", PRETRAIN, str(tmp_path / name)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        path = Path(result.stdout.strip().splitlines()[-1])
        weights.append(safetensors.torch.load_file(path / "model.safetensors"))
    differences = [float((weights[0][key] - weights[1][key]).abs().max()) for key in weights[0]]
    assert max(differences) < 1e-6, max(differences)


def test_an_unknown_shift_is_refused_even_when_the_clean_source_model_is_cached(tmp_path: Path) -> None:
    """The cache key of every shift but two is the clean source model's: an unknown shift returned it."""
    demo = surgical_peft.experiments.demo
    clean = demo.source_model_path("fog", cache_dir=tmp_path)
    clean.mkdir(parents=True)
    (clean / demo._SOURCE_METRICS).write_text('{"source_accuracy": 0.9}')  # a cached clean model, as far as it knows
    assert demo.source_model("fog", cache_dir=tmp_path) == clean
    with pytest.raises(InputError, match="Unknown shift 'rain'; valid choices: gaussian_noise"):
        demo.source_model("rain", cache_dir=tmp_path)
