"""Adapters saved by an earlier version still load and compute what they did: `tests/data/saved_adapters` holds
adapters saved at commit fd99a2c (before PEFT's parameter naming, `autocast_adapter_dtype` and `bias`), each with the
eval-mode logits of the model it was saved from (the tiny models of `conftest.py`, trained three SGD steps)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

SAVED = Path(__file__).parent / "data" / "saved_adapters"
ARCH = {"resnet-stage1": "resnet-basic", "vit-regex-head-saved": "vit", "vit-embeddings": "vit"}


@pytest.mark.parametrize("name", sorted(ARCH))
def test_an_adapter_saved_by_an_earlier_version_loads(
    name: str, make_model: Callable[..., nn.Module], logits_of: Callable[[nn.Module], torch.Tensor]
) -> None:
    model = PeftModel.from_pretrained(make_model(ARCH[name]), SAVED / name)
    assert model.peft_config["default"].bias == "surgical_only"
    expected = torch.load(SAVED / name / "logits.pt", weights_only=True)
    torch.testing.assert_close(logits_of(model), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits_of(make_model(ARCH[name])), expected, atol=1e-3)  # the adapter acts
