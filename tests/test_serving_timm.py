"""Serving timm models (plain and transformers' TimmWrapper): mixed-adapter batches and `fan_out`, row by row.

timm needs torchvision, which imports only beside its own torch build: these tests run in the second environment that
`.ci/run` builds (with tests/test_timm.py), and are skipped where timm is absent.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig, fan_out

timm = pytest.importorskip("timm")

TOLERANCE = 1e-5
IMAGES = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
NAMES = ["one", "two", "three", "__base__"]


def _timm_wrapper() -> nn.Module:
    from transformers import TimmWrapperConfig, TimmWrapperForImageClassification

    config = TimmWrapperConfig.from_dict({"architecture": "resnet18", "num_classes": 3, "num_labels": 3})
    return TimmWrapperForImageClassification(config)


# name -> (the model, its adapters' blocks); the ViT's `stem` holds `cls_token` and `pos_embed`, which the model
# itself owns (so that adapter runs the whole model per group).
MODELS = {
    "resnet18": (lambda: timm.create_model("resnet18", num_classes=3), ["stage1", "stage1", "stage3"]),
    "vit": (
        lambda: timm.create_model("vit_tiny_patch16_224", num_classes=3, img_size=32, patch_size=8, depth=2),
        ["layer2", "stem", "layer1"],
    ),
    "timm-wrapper": (_timm_wrapper, ["stage2", "head", "stage2"]),
}


@pytest.fixture(params=list(MODELS))
def model(request: pytest.FixtureRequest) -> nn.Module:
    """Three adapters (`NAMES`) with random deltas and, on BatchNorm models, running statistics of their own."""
    make, blocks = MODELS[request.param]
    torch.manual_seed(0)
    base = make().eval()
    peft_model = get_peft_model(base, SurgicalConfig(block=blocks[0], init_weights=False), adapter_name=NAMES[0])
    for name, block in zip(NAMES[1:], blocks[1:], strict=False):
        peft_model.add_adapter(name, SurgicalConfig(block=block, init_weights=False))
    for scale, name in enumerate(NAMES[:3], start=1):
        peft_model.set_adapter(name)
        peft_model.train()
        with torch.no_grad():
            peft_model(scale * torch.randn(8, 3, 32, 32))
    peft_model.set_adapter(NAMES[0])
    return peft_model.eval()


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def _alone(model: nn.Module, name: str) -> torch.Tensor:
    if name == "__base__":
        with model.disable_adapter():
            return _logits(model(IMAGES))
    model.set_adapter(name)
    try:
        return _logits(model(IMAGES))
    finally:
        model.set_adapter(NAMES[0])


def test_mixed_batch_rows_equal_each_adapter_alone(model: nn.Module) -> None:
    with torch.no_grad():
        mixed = _logits(model(IMAGES, adapter_names=NAMES))
    assert model.active_adapter == NAMES[0]
    for row, name in enumerate(NAMES):
        assert (mixed[row] - _alone(model, name)[row]).abs().max().item() <= TOLERANCE


def test_fan_out_equals_each_adapter_alone(model: nn.Module) -> None:
    keyword = "pixel_values" if hasattr(model.base_model.model, "timm_model") else "x"
    outputs = fan_out(model, adapter_names=NAMES, **{keyword: IMAGES})
    for name in NAMES:
        assert (_logits(outputs[name]) - _alone(model, name)).abs().max().item() <= TOLERANCE
