"""Self-training (`strategy="self-train"`): pseudo-labels kept by the ensemble's uncertainty, the student trained on
the labelled plus the kept images, the report of what was kept and how accurate it was, the true labels of the
unlabelled images never reaching training, and bad input through the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from peft import get_peft_model_state_dict

from surgical_peft.cli import main
from surgical_peft.training import FineTuneArguments, fine_tune

DATA = [
    {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), "labels": i % 3}
    for i in range(8)
]
UNLABELED = [
    {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(100 + i)), "labels": i % 3}
    for i in range(12)
]
TINY = ["--train-n", "30", "--eval-n", "20", "--epochs", "1", "--batch-size", "10", "--no-progress"]


def self_train(unlabeled: list[dict], **settings: object):
    args = FineTuneArguments(
        **{
            "strategy": "self-train",
            "blocks": ["stage1", "head"],
            "epochs": 2,
            "batch_size": 4,
            "progress": False,
            "unlabeled_dataset": unlabeled,
            "ensemble_size": 2,
            **settings,
        }
    )
    return fine_tune(build_model("resnet-basic"), DATA, DATA, args)


def deltas(result) -> dict[str, torch.Tensor]:
    return get_peft_model_state_dict(result.model)


def test_the_true_labels_of_the_unlabelled_images_never_reach_training() -> None:
    relabelled = [{**example, "labels": (example["labels"] + 1) % 3} for example in UNLABELED]
    results = [self_train(unlabeled, pseudo_label_threshold=1.0) for unlabeled in (UNLABELED, relabelled)]
    first, second = (deltas(result) for result in results)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    kept = [result.history[0]["pseudo_labels_kept"] for result in results]
    assert kept == [len(UNLABELED)] * 2  # threshold 1: every pseudo-label is kept
    accuracies = [result.metrics["pseudo_label_accuracy"] for result in results]
    assert accuracies[0] != accuracies[1]  # scored against the labels each was given, and only scored


def test_nothing_kept_gives_the_surgical_adapter_and_the_student_learns_from_what_is_kept() -> None:
    nothing = self_train(UNLABELED, pseudo_label_threshold=0.0)
    assert nothing.history[0]["pseudo_labels_kept"] == 0 and "pseudo_label_accuracy" not in nothing.history[0]
    surgical = fine_tune(
        build_model("resnet-basic"),
        DATA,
        DATA,
        FineTuneArguments(blocks=["stage1", "head"], epochs=2, batch_size=4, progress=False),
    )
    expected, got = deltas(surgical), deltas(nothing)
    assert all(torch.equal(expected[name], got[name]) for name in expected)  # the student trained on DATA alone
    everything = deltas(self_train(UNLABELED, pseudo_label_threshold=1.0))
    assert any(not torch.equal(expected[name], everything[name]) for name in expected)


def test_rounds_are_reported_and_the_adapter_holds_the_student_alone() -> None:
    result = self_train(UNLABELED, pseudo_label_threshold=0.999, self_train_rounds=2)
    rounds = [record for record in result.history if "pseudo_labels_kept" in record]
    assert [record["phase"] for record in rounds] == ["self-train round 1", "self-train round 2"]
    for record in rounds:
        assert record["unlabeled"] == len(UNLABELED) and 0 <= record["pseudo_labels_kept"] <= len(UNLABELED)
        assert 0 <= record["teacher_eval_accuracy"] <= 1
    assert result.metrics["pseudo_labels_kept"] == rounds[-1]["pseudo_labels_kept"]
    assert list(result.model.peft_config) == ["default"]
    assert [record["epoch"] for record in result.history if "epoch" in record] == [1, 2]  # the student's epochs


def test_self_training_through_main(tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path)]
    argv += ["--strategy", "self-train", "--unlabeled-n", "40", "--ensemble-size", "2"]
    assert main([*argv, "--pseudo-label-threshold", "1"]) == 0
    out = capsys.readouterr().out
    assert "self-train round 1: kept 40/40 pseudo-labels, " in out and "% of them right" in out
    summary = json.loads((tmp_path / "metrics.json").read_text())
    assert summary["history"][0]["pseudo_labels_kept"] == 40
    assert 0 <= summary["metrics"]["pseudo_label_accuracy"] <= 1
    assert summary["unlabeled_n"] == 40 and summary["blocks"] == ["stage2"]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        # your own model on digits: all 1,797 images are the target; 30 train and 20 evaluate
        (["--unlabeled-n", "1800"], "unlabeled_n=1800 must be between 0 and what remains of the target data"),
        (["--unlabeled-n", "1800"], "so unlabeled_n can be at most 1747"),
        (["--unlabeled-n", "-3"], "unlabeled_n=-3 must be between 0"),
        (["--unlabeled-n", "5", "--pseudo-label-threshold", "1.5"], "must be in [0, 1]"),
        (["--unlabeled-n", "5", "--pseudo-label-threshold", "nan"], "pseudo_label_threshold is a normalised entropy"),
        (["--unlabeled-n", "5", "--self-train-rounds", "0"], "self_train_rounds must be at least 1, got 0."),
        (["--unlabeled-n", "5", "--ensemble-size", "0"], "ensemble_size must be at least 1, got 0."),
        ([], "--strategy self-train needs unlabelled target images: --unlabeled-n N"),
    ],
)
def test_bad_self_training_input_exits_2(
    argv: list[str], message: str, tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    base = ["train", "--model", tiny_model, "--block", "stage2", "--shift", "none", *TINY, "--output-dir", str(output)]
    assert main([*base, "--strategy", "self-train", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("surgical-peft train: error: ") and message in error, error
    assert not output.exists()


def test_unlabeled_n_without_self_training_exits_2(tiny_model: str, tmp_path: Path, capsys) -> None:
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--output-dir", str(tmp_path / "run")]
    assert main([*argv, "--unlabeled-n", "10"]) == 2
    assert "--unlabeled-n 10 applies to --strategy self-train only, not 'surgical'" in capsys.readouterr().err


def test_a_self_training_rerun_starts_over(tiny_model: str, tmp_path: Path) -> None:
    """Nothing is checkpointed (the pseudo-labels depend on every epoch of the ensemble): a rerun with more epochs
    gives the run that had them from the start."""
    argv = ["train", "--model", tiny_model, "--block", "stage2", *TINY, "--strategy", "self-train"]
    argv += ["--unlabeled-n", "20", "--ensemble-size", "2", "--pseudo-label-threshold", "1"]
    rerun, fresh = tmp_path / "rerun", tmp_path / "fresh"
    assert main([*argv, "--output-dir", str(rerun)]) == 0
    assert not (rerun / "checkpoints").exists()
    assert main([*argv, "--output-dir", str(rerun), "--epochs", "2"]) == 0
    assert main([*argv, "--output-dir", str(fresh), "--epochs", "2"]) == 0
    adapters = [(path / "adapter" / "adapter_model.safetensors").read_bytes() for path in (rerun, fresh)]
    assert adapters[0] == adapters[1]
    assert [r["epoch"] for r in json.loads((rerun / "metrics.json").read_text())["history"] if "epoch" in r] == [1, 2]
