"""The greedy criterion (SubTuning): a block subset grown by held-out accuracy, its stopping threshold, its scores,
`select_blocks` tuning the subset, and bad thresholds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from transformers import ResNetConfig, ResNetForImageClassification

from surgical_peft import SurgicalConfig, list_blocks, rank_blocks, select_blocks
from surgical_peft.cli import main
from surgical_peft.criteria import greedy
from surgical_peft.training import FineTuneArguments

FAST = FineTuneArguments(epochs=1, batch_size=8, learning_rate=1e-2, progress=False)


def examples(n: int = 24, num_labels: int = 3) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % num_labels} for i in range(n)]


@pytest.fixture
def resnet(make_model) -> nn.Module:
    return make_model("resnet-basic")


@pytest.fixture
def accuracy_table(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """Replace fine-tuning by a table: held-out accuracy of each block subset (untouched model: 0.3). Returns the
    subsets tried, in order."""
    table = {
        (): 0.3,
        ("embedder",): 0.40,
        ("stage1",): 0.50,
        ("stage2",): 0.45,
        ("head",): 0.60,
        ("embedder", "head"): 0.70,
        ("head", "stage1"): 0.65,
        ("head", "stage2"): 0.62,
        ("embedder", "head", "stage1"): 0.72,
        ("embedder", "head", "stage2"): 0.69,
        ("embedder", "head", "stage1", "stage2"): 0.69,
    }
    tried: list[tuple[str, ...]] = []

    def tuned_accuracy(base: nn.Module, blocks: Sequence[str], *args: object) -> float:
        tried.append(tuple(blocks))
        return table[tuple(sorted(blocks))]

    monkeypatch.setattr(greedy, "tuned_accuracy", tuned_accuracy)
    monkeypatch.setattr(greedy._Search, "untouched_accuracy", lambda self, device: table[()])
    return tried


def test_greedy_grows_a_non_contiguous_subset_until_the_gain_is_below_the_threshold(
    resnet: nn.Module, accuracy_table: list[tuple[str, ...]]
) -> None:
    loader = DataLoader(examples(), batch_size=8)
    ranking = rank_blocks(resnet, loader, "greedy", sweep_args=FAST, greedy_threshold=0.05, progress=False)
    # round 1: head (+0.30); round 2: embedder (+0.10); round 3: stage1 would add only 0.02 <= 0.05, so stop
    assert ranking.chosen == ["head", "embedder"]
    assert len(accuracy_table) == 4 + 3 + 2
    assert accuracy_table[4:7] == [("head", "embedder"), ("head", "stage1"), ("head", "stage2")]
    assert list(ranking.scores) == ["embedder", "stage1", "stage2", "head"]  # forward order
    assert ranking.scores == pytest.approx({"head": 0.30, "embedder": 0.10, "stage1": 0.02, "stage2": -0.01})
    assert ranking.ranked() == ["head", "embedder", "stage1", "stage2"]  # the chosen blocks first
    assert ranking.num_examples == 6 and set(ranking.block_seconds) == set(ranking.scores)
    assert ranking.seconds >= sum(ranking.block_seconds.values())
    text = str(ranking)
    assert text.startswith("greedy:") and text.count("<- chosen") == 2
    assert json.loads(json.dumps(ranking.to_dict()))["chosen"] == ["head", "embedder"]
    # a threshold of 0: stage1 (+0.02) joins too, then stage2 (-0.03) does not
    assert rank_blocks(resnet, loader, "greedy", sweep_args=FAST, progress=False).chosen == [
        "head",
        "embedder",
        "stage1",
    ]


def test_the_first_block_joins_even_below_the_threshold(resnet: nn.Module, accuracy_table: list) -> None:
    loader = DataLoader(examples(), batch_size=8)
    ranking = rank_blocks(resnet, loader, "greedy", sweep_args=FAST, greedy_threshold=0.5, progress=False)
    assert ranking.chosen == ["head"] and len(accuracy_table) == 4  # one round: nothing gained more than 0.5
    assert ranking.scores == pytest.approx({"embedder": 0.10, "stage1": 0.20, "stage2": 0.15, "head": 0.30})
    assert ranking.best(1) == ["head"]


def test_select_blocks_tunes_the_greedy_subset(resnet: nn.Module, accuracy_table: list) -> None:
    loader = DataLoader(examples(), batch_size=8)
    config = SurgicalConfig(block="auto", auto_criterion="greedy", auto_top_k=1)
    resolved = select_blocks(resnet, loader, config, sweep_args=FAST, greedy_threshold=0.05, progress=False)
    assert resolved.block == ["embedder", "head"]  # the subset, in forward order, whatever auto_top_k says
    peft_model = get_peft_model(resnet, resolved)
    assert peft_model.peft_config["default"].target_modules == list_blocks(resnet).target_modules(["embedder", "head"])


def test_greedy_fine_tunes_copies_and_its_first_round_is_the_sweep(resnet: nn.Module, take_snapshot, assert_untouched):
    before = take_snapshot(resnet)
    loader = DataLoader(examples(), batch_size=8)
    candidates = ["stage1", "stage2", "head"]
    sweep = rank_blocks(resnet, loader, "sweep", blocks=candidates, sweep_args=FAST, progress=False)
    ranking = rank_blocks(
        resnet, loader, "greedy", blocks=candidates, sweep_args=FAST, greedy_threshold=0.99, progress=False
    )
    first = sweep.best(1)[0]
    assert ranking.chosen == [first]  # nothing gains more than 0.99: one round, the sweep's best
    for block in candidates:  # gains over the untouched model: the sweep's accuracies shifted by one constant
        gain = ranking.scores[block] - ranking.scores[first]
        assert gain == pytest.approx(sweep.scores[block] - sweep.scores[first])
    assert -1 <= ranking.scores[first] <= 1 and ranking.num_examples == sweep.num_examples == 6
    assert_untouched(resnet, before)


@pytest.mark.parametrize("threshold", [-0.01, 1.0, 2, "0.1", True, float("nan")])
def test_a_threshold_outside_its_range_is_refused_before_any_fine_tuning(
    threshold: object, resnet: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(greedy, "tuned_accuracy", lambda *args: pytest.fail("fine-tuned despite a bad threshold"))
    with pytest.raises(ValueError, match=r"greedy_threshold is a held-out accuracy gain in \[0, 1\)"):
        rank_blocks(resnet, DataLoader(examples(8), batch_size=4), "greedy", greedy_threshold=threshold)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model")
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1], layer_type="basic", num_labels=2)
    ResNetForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("images")
    for label, colour in (("dark", 40), ("light", 210)):
        (root / label).mkdir()
        for index in range(12):
            Image.new("RGB", (16, 16), (colour, index * 10, 0)).save(root / label / f"{index}.png")
    return root


def test_cli_rank_greedy(model_dir: Path, image_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    arguments = ["rank", str(model_dir), str(image_folder), "--shift", "none", "--train-n", "8", "--image-size", "16"]
    arguments += ["--criterion", "greedy", "--epochs", "1", "--batch-size", "4"]
    scores = tmp_path / "ranking.json"
    assert main([*arguments, "--json", str(scores)]) == 0
    chosen = json.loads(scores.read_text())["chosen"]
    assert chosen and f"chosen blocks: {', '.join(chosen)}" in capsys.readouterr().out
    assert main([*arguments, "--greedy-threshold", "1.5"]) == 2
    assert capsys.readouterr().err.strip().endswith("greedy_threshold is a held-out accuracy gain in [0, 1); got 1.5.")
