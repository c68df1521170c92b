"""Block maps: names, forward order, coverage, resolution to `target_modules`, and the errors users see."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig, list_blocks

EXPECTED_BLOCKS = {
    "resnet-basic": ["embedder", "stage1", "stage2", "head"],
    "resnet-bottleneck": ["embedder", "stage1", "stage2", "head"],
    "vit": ["embeddings", "layer1", "layer2", "norm", "head"],
    "deit": ["embeddings", "layer1", "layer2", "norm", "head"],
    "beit": ["embeddings", "layer1", "layer2", "pooler", "head"],
    "dinov2": ["embeddings", "layer1", "layer2", "norm", "head"],
    "convnext": ["embeddings", "stage1", "stage2", "norm", "head"],
    "swin": ["embeddings", "stage1", "stage2", "norm", "head"],
}


class TwoTowers(nn.Module):
    """A custom model with no block structure."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
        self.decoder = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


def trainable(model: nn.Module) -> set[str]:
    """The names of the parameters that train, in the model itself (under a PeftModel: `base_model.model.<name>`)."""
    if isinstance(model, PeftModel):
        return {f"base_model.model.{name}" for name in trainable(model.base_model.model)}
    return {name for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_block_names(arch: str, make_model: Callable[..., nn.Module]) -> None:
    blocks = list_blocks(make_model(arch))
    assert blocks.structural
    assert list(blocks) == EXPECTED_BLOCKS[arch]


def test_blocks_cover_every_tensor_once(arch: str, make_model: Callable[..., nn.Module]) -> None:
    model = make_model(arch)
    blocks = list_blocks(model)
    owners = {name: [b for b in blocks if blocks.block_of(name) == b] for name in model.state_dict()}
    assert all(len(found) == 1 for found in owners.values()), owners
    for block, paths in blocks.items():
        parameters = [p for path in paths for p in model.get_submodule(path).parameters()]
        assert blocks.num_parameters[block] == sum(p.numel() for p in parameters)
    assert sum(blocks.num_parameters.values()) == model.num_parameters()


def test_forward_order_matches_hooks(arch: str, make_model: Callable[..., nn.Module]) -> None:
    model = make_model(arch)
    blocks = list_blocks(model)
    fired: list[str] = []
    handles = [
        model.get_submodule(path).register_forward_pre_hook(lambda *_, block=block: fired.append(block))
        for block, paths in blocks.items()
        for path in paths
    ]
    with torch.no_grad():
        model(pixel_values=torch.zeros(1, 3, 32, 32))
    for handle in handles:
        handle.remove()
    first_calls = list(dict.fromkeys(fired))
    assert first_calls == list(blocks)


def test_block_resolves_to_saved_target_modules(
    arch: str, make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    model = make_model(arch)
    blocks = list_blocks(model)
    block = list(blocks)[1]
    peft_model = get_peft_model(model, SurgicalConfig(block=block))
    assert peft_model.peft_config["default"].target_modules == list(blocks[block])
    assert trainable(peft_model) == {
        f"base_model.model.{path}.{name}"
        for path in blocks[block]
        for name, _ in model.get_submodule(path).named_parameters()
    }
    peft_model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "SURGICAL"
    assert saved["block"] == block
    assert saved["target_modules"] == list(blocks[block])
    assert "verify_base" not in saved


def test_list_of_blocks_in_forward_order(make_model: Callable[..., nn.Module]) -> None:
    model = make_model("vit")
    peft_model = get_peft_model(model, SurgicalConfig(block=["head", "embeddings"]))
    assert peft_model.peft_config["default"].target_modules == ["vit.embeddings", "classifier"]
    blocks = list_blocks(model)
    expected = blocks.num_parameters["embeddings"] + blocks.num_parameters["head"]
    assert peft_model.get_nb_trainable_parameters()[0] == expected


def test_all_blocks_tunes_everything(make_model: Callable[..., nn.Module]) -> None:
    model = make_model("resnet-basic")
    peft_model = get_peft_model(model, SurgicalConfig(block="all"))
    assert trainable(peft_model) == {f"base_model.model.{name}" for name, _ in model.named_parameters()}


def test_target_modules_on_plain_sequential() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    peft_model = get_peft_model(model, SurgicalConfig(target_modules=["2"]))
    assert trainable(peft_model) == {"base_model.model.2.weight", "base_model.model.2.bias"}
    assert peft_model(torch.ones(3, 4)).shape == (3, 2)


def test_target_modules_list_suffix_and_regex_on_custom_module() -> None:
    # A list matches names exactly or as a suffix after a dot; a string is a regex matched against the full name.
    by_suffix = get_peft_model(TwoTowers(), SurgicalConfig(target_modules=["2"]))
    assert trainable(by_suffix) == {
        f"base_model.model.{tower}.2.{name}" for tower in ("encoder", "decoder") for name in ("weight", "bias")
    }
    by_regex = get_peft_model(TwoTowers(), SurgicalConfig(target_modules=r"decoder\.\d"))
    assert trainable(by_regex) == {
        f"base_model.model.decoder.{index}.{name}" for index in (0, 2) for name in ("weight", "bias")
    }
    whole_tower = get_peft_model(TwoTowers(), SurgicalConfig(target_modules=["encoder"]))
    assert trainable(whole_tower) == {
        f"base_model.model.encoder.{index}.{name}" for index in (0, 2) for name in ("weight", "bias")
    }
    excluded = get_peft_model(TwoTowers(), SurgicalConfig(target_modules=r".*\.\d", exclude_modules=["decoder.2"]))
    assert "base_model.model.decoder.2.weight" not in trainable(excluded)
    assert "base_model.model.encoder.2.weight" in trainable(excluded)


def test_generic_block_map_of_custom_module() -> None:
    blocks = list_blocks(TwoTowers())
    assert not blocks.structural
    assert dict(blocks) == {"encoder": ("encoder",), "decoder": ("decoder",)}
    assert blocks.num_parameters == {"encoder": 4 * 8 + 8 + 8 * 8 + 8, "decoder": 8 * 8 + 8 + 8 * 2 + 2}


def test_generic_block_map_covers_what_a_container_owns_and_fingerprints_it(tmp_path: Path) -> None:
    # A top-level container that owns a parameter beside its children (a cls_token, say): the parameter is a block of
    # its own, so every tensor lies in a block and the base fingerprint covers it; a single layer is one block.
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cls_token = nn.Parameter(torch.zeros(1, 4))
            self.body = nn.Linear(4, 2)

    blocks = list_blocks(Tokens())
    assert dict(blocks) == {"cls_token": ("cls_token",), "body": ("body",)}
    assert blocks.num_parameters == {"cls_token": 4, "body": 10}
    single = list_blocks(nn.Linear(2, 2))
    assert dict(single) == {"Linear": ("",)} and single.block_of("weight") == "Linear"
    base = Tokens()
    other = copy.deepcopy(base)
    with torch.no_grad():
        other.cls_token.fill_(1.0)
    get_peft_model(base, SurgicalConfig(target_modules=["body"])).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"block\(s\) cls_token differ"):  # another cls_token: another base
        PeftModel.from_pretrained(other, tmp_path)


def test_summary_shows_parameter_counts(arch: str, make_model: Callable[..., nn.Module]) -> None:
    model = make_model(arch)
    blocks = list_blocks(model)
    summary = str(blocks)
    assert summary.splitlines()[0].startswith(type(model).__name__)
    rows = summary.splitlines()[2:]
    assert [row.split()[0] for row in rows] == list(blocks)
    for row, (block, paths) in zip(rows, blocks.items(), strict=True):
        count = blocks.num_parameters[block]
        shown = f"{count / 1e3:.1f}K" if count >= 1e3 else str(count)
        assert row.split()[1] == shown
        assert row.endswith(", ".join(paths))
    assert repr(blocks) == summary


def test_list_blocks_of_peft_model(make_model: Callable[..., nn.Module]) -> None:
    model = make_model("resnet-basic")
    expected = dict(list_blocks(model))
    assert dict(list_blocks(get_peft_model(model, SurgicalConfig(block="head")))) == expected


# ------------------------------------------------------------------------------------------------------ bad input
BAD_CONFIGS: dict[str, tuple[str, SurgicalConfig, str]] = {
    "unknown block": (
        "resnet-basic",
        SurgicalConfig(block=["stage1", "stage9"]),
        r"Unknown block 'stage9' for ResNetForImageClassification. Valid blocks: embedder, stage1, stage2, head\.",
    ),
    "no block or target_modules": ("resnet-basic", SurgicalConfig(), "needs `block` or `target_modules`"),
    "block and other target_modules": (
        "resnet-basic",
        SurgicalConfig(block="stage1", target_modules=["classifier"]),
        "pass only one of them",
    ),
    "target_modules match nothing": (
        "vit",
        SurgicalConfig(target_modules=["no_such_module"]),
        r"(?s)not found in the base model.*ViTForImageClassification: 5 blocks",
    ),
    "target_modules regex matches nothing": (
        "two-towers",
        SurgicalConfig(target_modules=r"nothing\..*"),
        "not found in the base model",
    ),
    "target_modules hold no tensors": ("two-towers", SurgicalConfig(target_modules=["1"]), "hold no tensors"),
    "block without block map": (
        "two-towers",
        SurgicalConfig(block="encoder"),
        r"(?s)Pass `target_modules` instead.*surgical_peft.list_blocks\(model\).*TwoTowers: 2 blocks",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_leaves_the_model_untouched(
    case: str,
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
) -> None:
    arch, config, message = BAD_CONFIGS[case]
    model = TwoTowers() if arch == "two-towers" else make_model(arch)
    before = take_snapshot(model)
    with pytest.raises(ValueError, match=message):
        get_peft_model(model, config)
    assert_untouched(model, before)


@pytest.mark.parametrize("block", [[], 3, [1]])
def test_invalid_block_argument(block: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        SurgicalConfig(block=block)
