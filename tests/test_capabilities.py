"""PEFT's capability columns for SURGICAL, each checked the way PEFT's `scripts/generate_method_capabilities.py` (in
PEFT's repository) probes a method: on a model holding one module, `layer`, that the adapter targets.
`docs/peft-conformance.md` lists the columns with these tests; quantization is `tests/test_quantized.py`, conversion
to LoRA `tests/test_lora_export.py`, and mixed-adapter batches and hotswapping are the serving tests (issue 22)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
import torch
from peft import get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgical_peft import SurgicalConfig

WIDTH = 8


class SingleLayer(nn.Module):
    """PEFT's probe host: one named module, `layer`."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


LAYERS: dict[str, Callable[[], nn.Module]] = {  # PEFT's LAYER_SPECS
    "Linear": lambda: nn.Linear(WIDTH, WIDTH),
    "Embedding": lambda: nn.Embedding(16, WIDTH),
    "Conv1d": lambda: nn.Conv1d(WIDTH, WIDTH, 3),
    "Conv2d": lambda: nn.Conv2d(WIDTH, WIDTH, 3),
    "Conv3d": lambda: nn.Conv3d(WIDTH, WIDTH, 3),
    "LayerNorm": lambda: nn.LayerNorm(WIDTH),
    "MultiheadAttention": lambda: nn.MultiheadAttention(WIDTH, num_heads=2),
    "Conv1D (transformers)": lambda: Conv1D(WIDTH, WIDTH),
}


def probe(layer: nn.Module, **config: object) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(SingleLayer(layer), SurgicalConfig(**{"target_modules": ["layer"], **config}))


@pytest.mark.parametrize("kind", list(LAYERS))
def test_target_layer_types(kind: str) -> None:
    model = probe(LAYERS[kind]())
    assert any(isinstance(module, BaseTunerLayer) for module in model.modules())  # PEFT's signal
    layer_tensors = {name for name, _ in model.base_model.model.layer.named_parameters()}
    trainable = {name.rpartition(".")[2] for name, p in model.named_parameters() if p.requires_grad}
    assert {name.rpartition(".")[2] for name in layer_tensors} == trainable  # and it trains the layer's tensors


def test_a_modules_own_parameters_are_targets_by_name() -> None:
    """PEFT's `nn.Parameter` column is the `target_parameters` field (LoRA on an MoE's expert tensors); the surgical
    tuner has no such field, and tunes a module's own parameter named in `target_modules` instead."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bank = nn.Parameter(torch.randn(WIDTH, WIDTH))
            self.router = nn.Linear(WIDTH, WIDTH)

    model = probe(Experts(), target_modules=["layer.bank"])
    assert "target_parameters" not in {field.name for field in dataclasses.fields(SurgicalConfig)}
    assert [name for name, p in model.named_parameters() if p.requires_grad] == [
        "base_model.surgical_layers.layer/bank.tuned.default.bank"
    ]


def test_multiple_adapters() -> None:  # PEFT's probe: add_adapter, then set_adapter
    model = probe(nn.Linear(WIDTH, WIDTH))
    model.add_adapter("second", SurgicalConfig(target_modules=["layer"]))
    model.set_adapter("second")
    assert model.active_adapters == ["second"]


def test_merging() -> None:  # PEFT's probe: merge_and_unload computes what the adapter did
    model = probe(nn.Linear(WIDTH, WIDTH), init_weights=False).eval()
    x = torch.randn(2, WIDTH)
    with torch.no_grad():
        before = model(x)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(x), before, rtol=0, atol=1e-4)
    assert type(merged) is SingleLayer


def test_no_peft_mixed_model() -> None:
    with pytest.raises(ValueError, match="'SURGICAL' is not compatible with the `PeftMixedModel`"):
        get_peft_model(SingleLayer(nn.Linear(WIDTH, WIDTH)), SurgicalConfig(target_modules=["layer"]), mixed=True)


def test_lora_conversion() -> None:  # PEFT's probe; the conversion itself: tests/test_lora_export.py
    model = probe(nn.Linear(WIDTH, WIDTH))
    layer = next(module for module in model.modules() if isinstance(module, BaseTunerLayer))
    assert layer.supports_lora_conversion("default") and model.supports_lora_conversion()


def test_add_weighted_adapter() -> None:  # the sums themselves: tests/test_active_adapters.py
    model = probe(nn.Linear(WIDTH, WIDTH), init_weights=False)
    model.add_adapter("other", SurgicalConfig(target_modules=["layer"], init_weights=False))
    model.base_model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix")
    assert "mix" in model.peft_config


def test_auxiliary_modules_and_extras() -> None:
    fields = {field.name for field in dataclasses.fields(SurgicalConfig)}
    assert "modules_to_save" in fields and "trainable_token_indices" not in fields
    assert not fields & {"alpha_pattern", "layer_replication", "rank_pattern", "use_dora", "use_rslora"}


def test_paper_url() -> None:  # PEFT's script takes the one paper link of the config's docstring
    links = re.findall(
        r"https://(?:huggingface\.co/papers/|arxiv\.org/(?:abs|pdf)/)[^\s)\"'>]+", SurgicalConfig.__doc__
    )
    assert set(links) == {"https://huggingface.co/papers/2210.11466"}
