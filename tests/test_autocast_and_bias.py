"""Two PEFT options on a surgical adapter: `autocast_adapter_dtype` (PEFT's default: on a half-precision model the
tuned block trains in float32) and `bias` (`"surgical_only"`, the tuned modules' biases; `"all"`, every bias too)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from surgical_peft import SurgicalConfig, list_blocks

HALF = torch.bfloat16


def _dtypes(model: nn.Module, block: str) -> tuple[set[torch.dtype], set[torch.dtype]]:
    """The dtypes of the parameters in `block`, and of the others."""
    blocks = list_blocks(model)
    inside = {p.dtype for name, p in model.named_parameters() if blocks.block_of(name) == block}
    return inside, {p.dtype for name, p in model.named_parameters() if blocks.block_of(name) != block}


def _logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values.to(HALF)).logits


@pytest.mark.parametrize(("arch", "block"), [("vit", "layer1"), ("resnet-basic", "stage1")])
def test_a_half_precision_model_trains_its_block_in_float32(
    arch: str, block: str, make_model: Callable[..., nn.Module], pixel_values: torch.Tensor, tmp_path: Path
) -> None:
    base = make_model(arch).to(HALF)
    base_logits = _logits(make_model(arch).to(HALF), pixel_values)
    peft_model = get_peft_model(base, SurgicalConfig(block=block))
    assert _dtypes(base, block) == ({torch.float32}, {HALF})
    peft_model.train()
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        peft_model(pixel_values=pixel_values.to(HALF)).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    tuned = _logits(peft_model, pixel_values)
    assert tuned.dtype == HALF and torch.isfinite(tuned).all() and not torch.equal(tuned, base_logits)
    with peft_model.disable_adapter():  # the base, in its own dtype, exactly
        assert {p.dtype for p in base.parameters()} == {HALF}
        assert torch.equal(_logits(peft_model, pixel_values), base_logits)
    assert _dtypes(base, block) == ({torch.float32}, {HALF})

    peft_model.save_pretrained(tmp_path)
    deltas = load_file(tmp_path / "adapter_model.safetensors")
    assert {t.dtype for key, t in deltas.items() if key.endswith(".weight")} == {torch.float32}
    loaded = PeftModel.from_pretrained(make_model(arch).to(HALF), tmp_path)
    assert torch.equal(_logits(loaded, pixel_values), tuned)
    # PEFT's autocast_adapter_dtype=False: the block keeps the model's dtype (its float32 deltas rounded into it)
    kept = PeftModel.from_pretrained(make_model(arch).to(HALF), tmp_path, autocast_adapter_dtype=False)
    assert {p.dtype for p in kept.parameters()} == {HALF}
    assert torch.isfinite(_logits(kept, pixel_values)).all()

    assert torch.equal(_logits(peft_model.unload(), pixel_values), base_logits)
    assert {p.dtype for p in base.parameters()} == {HALF}


def test_switching_adapters_keeps_each_in_float32(
    make_model: Callable[..., nn.Module], pixel_values: torch.Tensor
) -> None:
    base = make_model("vit").to(HALF)
    peft_model = get_peft_model(base, SurgicalConfig(block="layer1", init_weights=False), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block="layer2", init_weights=False))
    one = _logits(peft_model, pixel_values)
    peft_model.set_adapter("two")
    assert _dtypes(base, "layer1") == ({HALF}, {HALF, torch.float32})  # only the active adapter's block is up
    assert _dtypes(base, "layer2")[0] == {torch.float32}
    peft_model.set_adapter("one")  # its float32 weights came back exactly
    assert torch.equal(_logits(peft_model, pixel_values), one)
    peft_model.delete_adapter("one")  # "two" is active now: layer1 is back in bfloat16
    assert _dtypes(base, "layer1")[0] == {HALF} and _dtypes(base, "layer2")[0] == {torch.float32}


class _TiedModel(nn.Module):
    """An embedding whose weight the output layer shares, as language models tie them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(ids)))


def test_tied_weights_keep_their_dtype_and_the_rest_is_upcast() -> None:
    model = _TiedModel().to(HALF)
    get_peft_model(model, SurgicalConfig(target_modules=["embed", "norm"]))
    assert model.embed.weight.dtype == HALF  # shared with head: float32 would break head's forward
    assert model.norm.weight.dtype == torch.float32  # its own: upcast, its output cast back
    assert model(torch.tensor([[1, 2, 3]])).dtype == HALF


def test_a_float32_model_is_left_as_it_is(make_model: Callable[..., nn.Module]) -> None:
    base = make_model("vit")
    get_peft_model(base, SurgicalConfig(block="layer1"))
    assert {p.dtype for p in base.parameters()} == {torch.float32}
    assert all(not module._forward_hooks for module in base.modules())


def _biases_and(model: nn.Module, block: str) -> set[str]:
    blocks = list_blocks(model)
    names = (name for name, _ in model.named_parameters())
    return {name for name in names if blocks.block_of(name) == block or "bias" in name.rpartition(".")[2]}


@pytest.mark.parametrize("target", ["block", "regex"])
def test_bias_all_tunes_every_bias_beside_the_block(
    target: str,
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    logits_of: Callable[..., Any],
    tmp_path: Path,
) -> None:
    model = make_model("resnet-basic")
    where = {"block": "stage1"} if target == "block" else {"target_modules": r"resnet\.encoder\.stages\.0"}
    peft_model = get_peft_model(model, SurgicalConfig(**where, bias="all"))
    expected = _biases_and(model, "stage1")
    assert {name for name, p in model.named_parameters() if p.requires_grad} == expected
    assert any("classifier" in name for name in expected)  # a bias outside the block
    base_logits = logits_of(make_model("resnet-basic"))
    train(peft_model)
    tuned = logits_of(peft_model)
    changed = {
        name
        for name, t in model.state_dict().items()
        if not torch.equal(t, make_model("resnet-basic").state_dict()[name])
    }
    assert changed - {name for name in changed if "running" in name or "batches" in name} <= expected
    with peft_model.disable_adapter():
        assert torch.equal(logits_of(peft_model), base_logits)

    peft_model.save_pretrained(tmp_path)
    saved = {key.removeprefix("base_model.model.") for key in load_file(tmp_path / "adapter_model.safetensors")}
    assert expected <= saved
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
    assert loaded.peft_config["default"].bias == "all"
    assert torch.equal(logits_of(loaded), tuned)

    with pytest.raises(ValueError, match=r"\['default'\] have bias='all'.*cannot add 'other' beside \['default'\]"):
        peft_model.add_adapter("other", SurgicalConfig(block="stage2"))
    assert list(peft_model.peft_config) == ["default"]
    assert torch.equal(logits_of(peft_model), tuned)


def test_bias_surgical_only_is_the_default_and_an_unknown_value_names_the_choices() -> None:
    assert SurgicalConfig(block="stage1").bias == "surgical_only"
    with pytest.raises(
        ValueError, match=r"Unknown bias 'lora_only'\. Valid: surgical_only, all \('surgical_only': the tuned"
    ):
        SurgicalConfig(block="stage1", bias="lora_only")


def test_a_bias_all_state_dict_loads_into_an_adapter_made_without_it(
    make_model: Callable[..., nn.Module], train: Callable[..., None], logits_of: Callable[..., Any]
) -> None:
    # As PEFT loads a LoRA state dict saved with bias="all" (set_peft_model_state_dict): the biases come with it.
    trained = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1", bias="all"))
    train(trained)
    state_dict = get_peft_model_state_dict(trained)
    fresh = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"))
    set_peft_model_state_dict(fresh, state_dict)
    assert fresh.peft_config["default"].bias == "all"
    assert torch.equal(logits_of(fresh), logits_of(trained))
    # anything beyond exactly the other biases is still refused, and the adapter is left as it was
    other = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"))
    extra = dict(state_dict)
    extra.pop(next(key for key in state_dict if key.endswith("classifier.1.bias")))
    with pytest.raises(ValueError, match="do not have"):
        set_peft_model_state_dict(other, extra)
    assert other.peft_config["default"].bias == "surgical_only"
    # a bad bias delta is refused before anything changes
    layers = set(other.base_model.surgical_layers)
    broken = dict(state_dict)
    key = next(key for key in state_dict if key.endswith("classifier.1.bias"))
    broken[key] = broken[key][:1]
    with pytest.raises(ValueError, match="has shape"):
        set_peft_model_state_dict(other, broken)
    assert other.peft_config["default"].bias == "surgical_only"
    assert set(other.base_model.surgical_layers) == layers
