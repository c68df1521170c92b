"""timm backbones: blocks from timm's layer groups, for timm models and transformers' TimmWrapper; exact round trips.

timm needs torchvision, which imports only beside its own torch build: these tests run in the second environment
that `.ci/run` builds (see docs/guides/blocks.md), and are skipped where timm is absent.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from surgical_peft import SurgicalConfig, list_blocks
from surgical_peft.blocks import unwrap_model
from surgical_peft.hub import render_model_card

timm = pytest.importorskip("timm")

PREFIX = "base_model.model."

# name -> (timm.create_model arguments, expected blocks); every model is tiny and randomly initialised.
MODELS = {
    "resnet18": ({}, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
    "vit_tiny_patch16_224": (
        {"img_size": 32, "patch_size": 8, "depth": 2},
        ["stem", "layer1", "layer2", "norm", "head"],
    ),
    "convnext_atto": (
        {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32)},
        ["stem", *(f"stage{i}" for i in range(1, 5)), "head"],
    ),
    "efficientnet_b0": (
        {},
        ["stem", *(f"stage{i}" for i in range(1, 8)), "conv_head", "norm", "head"],
    ),
    "regnetx_002": ({}, ["stem", "stage1", "stage2", "stage3", "stage4", "head"]),
}


def create(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=3, **MODELS[name][0]).eval()


def wrapper(seed: int = 0) -> nn.Module:
    """transformers' TimmWrapperForImageClassification around a timm ResNet-18, built offline."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig.from_dict({"architecture": "resnet18", "num_classes": 3, "num_labels": 3})
    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(config).eval()


IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
LABELS = torch.tensor([0, 1, 2, 0])


def logits(model: nn.Module, train: bool = False) -> torch.Tensor:
    """The model's logits on `IMAGES`, for a timm model (`model(x)`) or a transformers one (`.logits`)."""
    model.train(train)
    if hasattr(unwrap_model(model), "timm_model"):
        return model(pixel_values=IMAGES).logits
    return model(IMAGES)


def train_steps(model: nn.Module, steps: int = 3) -> None:
    """A few SGD steps on the trainable parameters, in train() mode (BatchNorm statistics move)."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        nn.functional.cross_entropy(logits(model, train=True), LABELS).backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@pytest.mark.parametrize("name", list(MODELS))
def test_block_names_and_counts(name: str) -> None:
    model = create(name)
    blocks = list_blocks(model)
    assert blocks.structural
    assert list(blocks) == MODELS[name][1]
    for tensor_name in model.state_dict():  # every tensor in exactly one block
        assert blocks.block_of(tensor_name) is not None, tensor_name
    assert sum(blocks.num_parameters.values()) == sum(p.numel() for p in model.parameters())


def vit_wrapper(seed: int = 0) -> nn.Module:
    """transformers' TimmWrapperForImageClassification around a tiny timm ViT, built offline."""
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    arguments = {"img_size": 32, "patch_size": 8, "depth": 2}
    config = TimmWrapperConfig.from_dict(
        {"architecture": "vit_tiny_patch16_224", "num_classes": 3, "num_labels": 3, "model_args": arguments}
    )
    torch.manual_seed(seed)
    return TimmWrapperForImageClassification(config).eval()


@pytest.mark.parametrize(
    ("make", "prefix"), [(lambda: create("vit_tiny_patch16_224"), ""), (vit_wrapper, "timm_model.")]
)
def test_vit_root_tensors_are_in_the_stem(make: Callable[[], nn.Module], prefix: str) -> None:
    # A timm ViT owns cls_token and pos_embed itself, beside its blocks: timm's stem group holds them, and so does
    # the stem block, as tensor paths that the tuner tunes by themselves.
    model = make()
    stem = list_blocks(model)["stem"]
    assert stem == tuple(f"{prefix}{path}" for path in ("cls_token", "pos_embed", "patch_embed"))
    get_peft_model(model, SurgicalConfig(block="stem"))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {f"{prefix}cls_token", f"{prefix}pos_embed", f"{prefix}patch_embed.proj.weight"} <= trainable
    assert all(name.startswith(stem) for name in trainable)


def test_vit_block_all_trains_every_parameter() -> None:
    model = create("vit_tiny_patch16_224")
    get_peft_model(model, SurgicalConfig(block="all"))
    assert all(p.requires_grad for p in model.parameters())


def test_wrapper_blocks_are_the_timm_models() -> None:
    blocks = list_blocks(wrapper())
    assert list(blocks) == MODELS["resnet18"][1]
    assert blocks["stem"] == ("timm_model.conv1", "timm_model.bn1")
    assert blocks["stage1"] == ("timm_model.layer1",)
    assert blocks["head"] == ("timm_model.fc",)


def test_timm_model_without_group_matcher_gets_the_generic_map() -> None:
    class Plain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 2)

    Plain.__module__ = "timm.models.plain"  # looks like a timm model, but declares no layer groups
    blocks = list_blocks(Plain())
    assert not blocks.structural
    assert list(blocks) == ["features", "classifier"]


@pytest.mark.parametrize(
    ("make", "block"),
    [
        (lambda seed: create("resnet18", seed), "stage1"),
        (lambda seed: create("resnet18", seed), "stem"),
        (lambda seed: create("vit_tiny_patch16_224", seed), "layer2"),
        (lambda seed: create("vit_tiny_patch16_224", seed), "stem"),
        (vit_wrapper, "stem"),
        (lambda seed: create("efficientnet_b0", seed), "stage3"),
        (wrapper, "stage2"),
    ],
    ids=[
        "resnet-stage1",
        "resnet-stem",
        "vit-layer2",
        "vit-stem",
        "vit-wrapper-stem",
        "efficientnet-stage3",
        "wrapper-stage2",
    ],
)
def test_round_trip_after_training_in_train_mode(make: Callable[[int], nn.Module], block: str, tmp_path: Path) -> None:
    model = make(0)
    blocks = list_blocks(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(model, SurgicalConfig(block=block))
    train_steps(peft_model)
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and {blocks.block_of(name) for name in changed} == {block}  # frozen BatchNorm did not drift
    tuned = logits(peft_model)
    peft_model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {blocks.block_of(key.removeprefix(PREFIX)) for key in saved} == {block}
    loaded = PeftModel.from_pretrained(make(0), tmp_path)
    torch.testing.assert_close(logits(loaded), tuned, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=block):  # another checkpoint's weights are refused, naming the block
        PeftModel.from_pretrained(make(1), tmp_path)


@pytest.mark.parametrize(
    ("make", "loader"),
    [
        (wrapper, 'AutoModelForImageClassification.from_pretrained("timm/resnet18.a1_in1k")'),
        (lambda: create("resnet18"), 'timm.create_model("hf-hub:timm/resnet18.a1_in1k", pretrained=True)'),
    ],
    ids=["wrapper", "timm"],
)
def test_model_card_loads_the_base_as_it_was_loaded(make: Callable[[], nn.Module], loader: str) -> None:
    base = make()
    base.name_or_path = "timm/resnet18.a1_in1k"  # what loading by Hub id records
    card = render_model_card(get_peft_model(base, SurgicalConfig(block="stage4")), repo_id="me/resnet18-stage4")
    assert "pipeline_tag: image-classification" in card.splitlines()
    assert f"base = {loader}" in card.splitlines()


def test_cli_trains_a_vit_wrappers_stem_on_your_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a user runs it: a timm ViT (fixed to 32-pixel images) saved by transformers, an imagefolder, `blocks`, then
    # `train --block stem`, which tunes cls_token and pos_embed too; the images take the size the model is fixed to.
    from PIL import Image

    from surgical_peft.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    vit_wrapper().save_pretrained(tmp_path / "model")
    for label in range(3):
        (tmp_path / "images" / str(label)).mkdir(parents=True)
        for row in range(6):
            Image.new("RGB", (20, 20), (80 * label, 30 * row, 0)).save(tmp_path / "images" / str(label) / f"{row}.png")
    assert main(["blocks", str(tmp_path / "model")]) == 0
    assert "timm_model.cls_token, timm_model.pos_embed, timm_model.patch_embed" in capsys.readouterr().out
    argv = ["--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "images"), "--train-n", "9"]
    run = ["train", *argv, "--block", "stem", "--epochs", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert main(run) == 0
    assert "9 for training, 9 for evaluation" in capsys.readouterr().out
    saved = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {f"{PREFIX}timm_model.cls_token", f"{PREFIX}timm_model.pos_embed"} <= set(saved)
    assert any(bool(saved[key].abs().max() > 0) for key in saved if key.endswith(("cls_token", "pos_embed")))
