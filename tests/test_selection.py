"""Block selection: Auto-RGN, Auto-SNR and the sweep rank blocks without touching the model; `block="auto"`."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import build_model
from peft import get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from surgical_peft import BlockRanking, SurgicalConfig, list_blocks, rank_blocks, select_blocks
from surgical_peft.cli import main
from surgical_peft.gradients import relative_gradient_norms
from surgical_peft.training import FineTuneArguments, fine_tune

Snapshot = dict[str, torch.Tensor]


def examples(n: int = 16, num_labels: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, 32, 32, generator=generator), "labels": i % num_labels} for i in range(n)]


@pytest.fixture
def loader() -> DataLoader:
    return DataLoader(examples(), batch_size=8)


@pytest.fixture
def resnet(make_model: Callable[..., nn.Module]) -> nn.Module:
    """A tiny ResNet with non-trivial BatchNorm statistics and biases, left in train mode."""
    model = make_model("resnet-basic")
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.bias.data.normal_(0, 0.1, generator=generator)
            module.running_mean.normal_(0, 0.1, generator=generator)
    return model.train()


def snapshot(model: nn.Module) -> tuple[Snapshot, dict[str, bool], dict[str, bool]]:
    """Every parameter and buffer, the requires_grad flags and the train/eval mode of every module."""
    tensors = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    return tensors, flags, modes


def assert_unchanged(model: nn.Module, before: tuple[Snapshot, dict[str, bool], dict[str, bool]]) -> None:
    tensors, flags, modes = snapshot(model)
    assert [name for name, tensor in before[0].items() if not torch.equal(tensors[name], tensor)] == []
    assert (flags, modes) == before[1:]
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("criterion", ["rgn", "snr"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["plain", "peft"])
def test_gradient_criteria_score_every_block_and_leave_the_model_alone(
    criterion: str,
    wrapped: bool,
    resnet: nn.Module,
    loader: DataLoader,
) -> None:
    model = get_peft_model(resnet, SurgicalConfig(block="stage1")) if wrapped else resnet
    model.train()
    before = snapshot(model)
    ranking = rank_blocks(model, loader, criterion, num_batches=2, progress=False)
    blocks = list_blocks(model)
    assert list(ranking.scores) == list(blocks)
    assert ranking.num_parameters == blocks.num_parameters
    assert all(math.isfinite(score) and score >= 0 for score in ranking.scores.values())
    assert ranking.num_examples == 16
    assert len(ranking.tensor_scores) == sum(1 for _ in resnet.parameters())
    assert_unchanged(model, before)  # weights, BatchNorm statistics, requires_grad (frozen stays frozen), modes


def test_only_the_head_has_a_gradient(resnet: nn.Module, loader: DataLoader) -> None:
    # With a zero classifier matrix, d loss / d features = W^T (p - y) = 0: no block but the head gets a gradient.
    nn.init.zeros_(resnet.classifier[1].weight)
    for criterion in ("rgn", "snr"):
        ranking = rank_blocks(resnet, loader, criterion, progress=False)
        assert ranking.best() == ["head"]
        assert all(score == 0 for block, score in ranking.scores.items() if block != "head")


def test_rgn_is_the_relative_gradient_norm_averaged_over_batches(resnet: nn.Module, loader: DataLoader) -> None:
    weight = resnet.classifier[1].weight
    expected = []
    for batch in loader:
        resnet.eval()
        logits = resnet(pixel_values=batch["pixel_values"]).logits
        (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(logits, batch["labels"]), [weight])
        expected.append(float(gradient.norm() / weight.detach().norm()))
    resnet.train()
    (value,) = relative_gradient_norms(resnet, loader, parameters=[weight])
    assert value == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    ranking = rank_blocks(resnet, loader, "rgn", progress=False)
    assert ranking.tensor_scores["classifier.1.weight"] == pytest.approx(value, rel=1e-5)


def test_snr_is_mean_squared_over_variance_of_per_example_gradients(resnet: nn.Module, loader: DataLoader) -> None:
    weight = resnet.classifier[1].weight
    resnet.eval()
    per_example = []
    for batch in loader:
        for pixel_values, label in zip(batch["pixel_values"], batch["labels"], strict=True):
            logits = resnet(pixel_values=pixel_values[None]).logits
            per_example.append(torch.autograd.grad(nn.functional.cross_entropy(logits, label[None]), [weight])[0])
    gradients = torch.stack(per_example).double()
    mean, variance = gradients.mean(0), gradients.var(0)
    assert (mean[variance == 0] == 0).all()  # dead units: no gradient at all, scored 0
    expected = torch.where(variance > 0, mean**2 / variance, 0).mean()
    ranking = rank_blocks(resnet, loader, "snr", progress=False)
    assert ranking.tensor_scores["classifier.1.weight"] == pytest.approx(float(expected), rel=1e-3)
    mask = ranking.tensor_mask(0.5)
    assert set(mask) == set(ranking.tensor_scores) and any(mask.values())


def test_sweep_fine_tunes_a_copy_per_block(resnet: nn.Module) -> None:
    before = snapshot(resnet)
    loader = DataLoader(examples(24), batch_size=8)
    args = FineTuneArguments(epochs=1, batch_size=8, learning_rate=1e-2, progress=False)
    ranking = rank_blocks(resnet, loader, "sweep", blocks=["stage1", "head"], sweep_args=args, progress=False)
    assert list(ranking.scores) == ["stage1", "head"]
    assert all(0 <= score <= 1 for score in ranking.scores.values())
    assert ranking.num_examples == 6  # a quarter held out
    assert set(ranking.block_seconds) == {"stage1", "head"} and ranking.seconds >= sum(ranking.block_seconds.values())
    assert_unchanged(resnet, before)
    with pytest.raises(ValueError, match="no tensor mask"):
        ranking.tensor_mask()


def test_block_ranking_table_order_and_outputs(tmp_path) -> None:
    ranking = BlockRanking(
        "sweep", {"embedder": 0.5, "stage1": 0.9, "head": 0.9}, {"embedder": 5, "stage1": 7, "head": 2}
    )
    assert ranking.ranked() == ["stage1", "head", "embedder"]  # ties keep forward order
    assert ranking.best(2) == ["stage1", "head"] and ranking.best(10) == ranking.ranked()
    text = str(ranking)
    assert "sweep" in text and text.splitlines()[3].split()[:2] == ["1", "stage1"] and "<- best" in text
    assert json.loads(json.dumps(ranking.to_dict()))["blocks"][0] == {
        "block": "embedder",
        "score": 0.5,
        "num_parameters": 5,
        "rank": 3,
    }
    pytest.importorskip("matplotlib")
    assert ranking.plot(tmp_path / "ranking.png").stat().st_size > 0
    with pytest.raises(ValueError, match="at least 1"):
        ranking.best(0)


def test_select_blocks_resolves_auto(resnet: nn.Module, loader: DataLoader) -> None:
    config = SurgicalConfig(block="auto", auto_criterion="snr", auto_top_k=2, delta_dtype="bfloat16")
    resolved = select_blocks(resnet, loader, config, progress=False)
    ranking = rank_blocks(resnet, loader, "snr", progress=False)
    assert resolved.block == ranking.best(2) and resolved.delta_dtype == "bfloat16"
    assert config.block == "auto"  # a copy
    peft_model = get_peft_model(resnet, resolved)
    assert peft_model.peft_config["default"].target_modules == list_blocks(resnet).target_modules(ranking.best(2))
    with pytest.raises(ValueError, match="block='auto'"):
        select_blocks(resnet, loader, SurgicalConfig(block="stage1"))


def test_auto_must_be_resolved_before_get_peft_model(resnet: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"surgical_peft\.select_blocks\(model, dataloader, config\)"):
        get_peft_model(resnet, SurgicalConfig(block="auto"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"block": ["auto", "head"]}, "cannot be combined"),
        ({"block": "auto", "auto_criterion": "random"}, "Unknown auto_criterion"),
        ({"block": "auto", "auto_top_k": 0}, "auto_top_k"),
    ],
)
def test_auto_config_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SurgicalConfig(**kwargs)


def test_fine_tune_resolves_auto_blocks_and_scales_learning_rates_by_rgn(resnet: nn.Module) -> None:
    data = examples(16)
    expected = rank_blocks(resnet, DataLoader(data, batch_size=8), "rgn", progress=False).best()
    args = FineTuneArguments(blocks=["auto"], epochs=1, batch_size=8, progress=False)
    result = fine_tune(copy.deepcopy(resnet), data, None, args)
    assert result.model.peft_config["default"].block == expected
    args = FineTuneArguments(strategy="full", lr_mode="rgn", epochs=1, batch_size=8, progress=False)
    assert math.isfinite(fine_tune(copy.deepcopy(resnet), data, None, args).metrics["train_loss"])
    with pytest.raises(ValueError, match="cannot be combined"):
        FineTuneArguments(blocks=["auto", "head"])


@pytest.mark.parametrize("criterion", ["rgn", "snr", "sweep"])
def test_bad_input(criterion: str, resnet: nn.Module) -> None:
    unlabelled = DataLoader([{"pixel_values": torch.randn(3, 32, 32)}] * 4, batch_size=2)
    with pytest.raises(ValueError, match="'labels'"):
        rank_blocks(resnet, unlabelled, criterion, progress=False)
    with pytest.raises(ValueError, match="empty"):
        rank_blocks(resnet, DataLoader([], batch_size=2), criterion, progress=False)
    with pytest.raises(ValueError, match="No candidate block"):
        rank_blocks(resnet, DataLoader(examples(4), batch_size=2), criterion, blocks=[], progress=False)
    with pytest.raises(ValueError, match="Valid blocks"):
        rank_blocks(resnet, DataLoader(examples(4), batch_size=2), criterion, blocks=["stage9"], progress=False)


def test_bad_criterion_and_parameterless_model(loader: DataLoader) -> None:
    with pytest.raises(ValueError, match="Unknown criterion"):
        rank_blocks(nn.Linear(2, 2), loader, "random")
    with pytest.raises(ValueError, match="No candidate block"):
        rank_blocks(nn.Sequential(nn.ReLU()), loader, "rgn")


@pytest.mark.parametrize("criterion", ["rgn", "snr"])
@pytest.mark.parametrize(("num_batches", "total"), [(4, 2), (1, 1)])
def test_the_progress_bar_counts_the_batches_that_run(
    criterion: str, num_batches: int, total: int, resnet: nn.Module, loader: DataLoader, monkeypatch
) -> None:
    """Two batches of 8 with num_batches=4: the bar's total is 2, and it ends full."""
    import surgical_peft.criteria._base

    bars = []

    class Recording(surgical_peft.criteria._base.tqdm):
        def close(self) -> None:
            bars.append((self.total, self.n))
            super().close()

    monkeypatch.setattr(surgical_peft.criteria._base, "tqdm", Recording)
    rank_blocks(resnet, loader, criterion, num_batches=num_batches, progress=True)
    assert set(bars) == {(total, total)}  # (tqdm may close a bar twice)


def zero_biased_model(tmp_path: Path, *, zero_everything: bool = False) -> str:
    """A tiny digits ResNet, saved as transformers initialises it (BatchNorm biases of zeros) or with all tensors 0."""
    model = build_model("resnet-basic", num_labels=10)
    model.config.image_size = 32
    if zero_everything:
        for parameter in model.parameters():
            nn.init.zeros_(parameter)
    model.save_pretrained(tmp_path / "model")
    return str(tmp_path / "model")


def test_rgn_leaves_tensors_without_a_scale_out_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Dividing by a floored norm scored each backbone block about 4e10 here, and the embedder "best".
    model = zero_biased_model(tmp_path)
    argv = ["rank", model, "digits", "--criterion", "rgn", "--train-n", "32", "--num-batches", "2"]
    assert main([*argv, "--json", str(tmp_path / "ranking.json")]) == 0
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "ranking.json").read_text())
    assert all(0 < row["score"] < 100 for row in saved["blocks"]), saved["blocks"]
    biases = [name for name, p in build_model("resnet-basic").named_parameters() if not p.any()]
    assert saved["unscored"] == biases and len(biases) == 6  # every BatchNorm bias, no classifier tensor
    assert not set(saved["tensor_scores"]) & set(biases) and saved["degenerate"] == ""
    assert "without a score, left out of their blocks' means (no scale, e.g. a bias of zeros)" in out
    assert f"best block: {max(saved['blocks'], key=lambda row: row['score'])['block']}" in out


def test_a_ranking_with_no_score_is_called_degenerate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = zero_biased_model(tmp_path, zero_everything=True)
    assert main(["rank", model, "digits", "--criterion", "rgn", "--train-n", "16", "--num-batches", "1"]) == 0
    out = capsys.readouterr().out
    assert "degenerate ranking: no block has a score" in out
    assert "best block: none singled out (no block has a score)" in out.splitlines()
    tied = BlockRanking(
        "snr", {"embedder": 0.0, "stage1": 0.0, "head": 0.0}, dict.fromkeys(["embedder", "stage1", "head"], 1)
    )
    assert tied.degenerate == "embedder, stage1 and head tie at the top (0); the first in forward order is named best"
    with pytest.warns(UserWarning, match="block='auto': the rgn ranking is degenerate: no block has a score"):
        select_blocks(
            build_model("resnet-basic").apply(lambda m: [nn.init.zeros_(p) for p in m.parameters(recurse=False)]),
            DataLoader(examples(8), batch_size=8),
            SurgicalConfig(block="auto"),
            progress=False,
        )


def test_auto_rgn_learning_rates_survive_tensors_without_a_scale(make_model: Callable[..., nn.Module]) -> None:
    # A zero bias's ratio used to be about 1e10 and the largest, which set every other tensor's rate near 0.
    model = make_model("resnet-basic")  # BatchNorm biases of zeros, as transformers initialises them
    before = model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight.detach().clone()
    args = FineTuneArguments(blocks=["stage1"], lr_mode="rgn", epochs=1, batch_size=8, progress=False)
    tuned = fine_tune(model, examples(16), None, args).model.get_base_model()
    after = tuned.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight.detach()
    assert float((after - before).abs().max()) > 1e-5  # (AdamW's first steps move a tensor by about lr * its rate)
