"""A surgical adapter exported as LoRA (`surgical_peft.convert_to_lora` / `save_as_lora`, and PEFT's own
`peft.convert_to_lora` / `peft.save_as_lora`, routed to them): loaded with `PeftModel.from_pretrained` onto a fresh
base, the LoRA adapter gives the surgical adapter's logits at full rank, on every kind of target."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from peft import LoHaConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import surgical_peft
from surgical_peft import SurgicalConfig, convert_to_lora, save_as_lora
from surgical_peft.errors import InputError

# ------------------------------------------------------------------------------------ ResNet and ViT, full rank
CASES = [
    ("resnet-basic", "stage1"),  # convs -> LoRA's Conv2d, BatchNorm (weights and statistics) -> modules_to_save
    ("resnet-basic", "embedder"),
    ("resnet-bottleneck", "all"),  # 1x1 and 3x3 convs, the projection shortcut, the head
    ("vit", "layer1"),  # linears with biases -> lora_bias, LayerNorms -> modules_to_save
    ("vit", "embeddings"),  # cls_token and position embeddings: the container ViTEmbeddings in full
    ("vit", ["layer2", "head"]),
]


@pytest.mark.parametrize(("arch", "block"), CASES)
@pytest.mark.parametrize("exporter", ["surgical_peft", "peft"])
def test_full_rank_lora_gives_the_surgical_logits(
    arch: str,
    block: str | list[str],
    exporter: str,
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    logits_of: Callable[[nn.Module], torch.Tensor],
    tmp_path: Path,
) -> None:
    model = get_peft_model(make_model(arch), SurgicalConfig(block=block))
    train(model, lr=0.05)  # (BatchNorm statistics move too)
    expected = logits_of(model)
    assert not torch.allclose(expected, logits_of(make_model(arch)), atol=1e-3)
    save = save_as_lora if exporter == "surgical_peft" else peft.save_as_lora
    save(tmp_path, model, rank=1.0)
    lora = PeftModel.from_pretrained(make_model(arch), tmp_path)
    assert lora.peft_config["default"].peft_type == peft.PeftType.LORA
    torch.testing.assert_close(logits_of(lora), expected, rtol=0, atol=1e-4)


def test_what_goes_where_on_a_vit_layer(make_model: Callable[..., nn.Module]) -> None:
    model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer1", init_weights=False))
    config, state_dict = convert_to_lora(model, rank=4)
    prefix = "vit.layers.0."
    linears = ["attention.k_proj", "attention.o_proj", "attention.q_proj", "attention.v_proj", "mlp.fc1", "mlp.fc2"]
    assert config.modules_to_save == [prefix + "layernorm_after", prefix + "layernorm_before"]
    assert config.lora_bias and config.r == config.lora_alpha == 4 and not config.rank_pattern
    lora_keys = {
        key.removeprefix("base_model.model.").rpartition(".lora_")[0] for key in state_dict if ".lora_" in key
    }
    assert lora_keys == {prefix + name for name in linears}
    assert state_dict[f"base_model.model.{prefix}mlp.fc1.lora_A.weight"].shape == (4, 16)
    assert state_dict[f"base_model.model.{prefix}mlp.fc1.lora_B.bias"].shape == (32,)


# ----------------------------------------------------------------------------------------- every kind of target
class EveryKind(nn.Module):
    """One module of each kind a surgical adapter may tune, used in one forward pass."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv1d = Conv1D(8, 8)  # transformers' (in, out) layout
        self.lin = nn.Linear(8, 8)
        self.seq_conv = nn.Conv1d(8, 8, 3, padding=1)
        self.grouped = nn.Conv1d(8, 8, 3, padding=1, groups=2)  # LoRA's conv layers cannot reproduce it
        self.dilated = nn.Conv1d(8, 8, 3, padding=2, dilation=2)  # nor this one
        self.norm = nn.LayerNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.conv2d = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.lin(self.conv1d(self.emb(tokens)))
        x = self.dilated(self.grouped(self.seq_conv(x.transpose(1, 2)))).transpose(1, 2)
        x = self.norm(x)
        x = x + self.mha(x, x, x, need_weights=False)[0]
        return x.flatten(1) + self.bn(self.conv2d(x.unsqueeze(1))).mean(1).flatten(1)


TOKENS = torch.randint(0, 10, (3, 5), generator=torch.Generator().manual_seed(0))


def every_kind(seed: int = 0) -> EveryKind:
    torch.manual_seed(seed)
    return EveryKind().eval()


def tuned(targets: list[str], **config: Any) -> PeftModel:
    """A surgical model of `every_kind()` whose `targets` have random deltas (and trained BatchNorm statistics)."""
    model = get_peft_model(every_kind(), SurgicalConfig(target_modules=targets, init_weights=False, **config))
    with torch.no_grad():
        if "bn" not in targets:
            return model
        model.base_model.model.bn.running_mean.add_(0.3)
        model.base_model.model.bn.running_var.mul_(1.5)
    return model


def exported(model: PeftModel, path: Path, rank: float = 1.0) -> PeftModel:
    save_as_lora(path, model, rank=rank)
    return PeftModel.from_pretrained(every_kind(), path).eval()


ALL = ["emb", "conv1d", "lin", "seq_conv", "grouped", "dilated", "norm", "mha", "conv2d", "bn"]


def test_every_kind_of_target_at_full_rank(tmp_path: Path) -> None:
    model = tuned(ALL)
    lora = exported(model, tmp_path)
    config = lora.peft_config["default"]
    # biases changed, so lora_bias; the Embedding then has no LoRA form (LoRA has no bias for embeddings)
    assert config.lora_bias
    assert sorted(config.modules_to_save) == ["bn", "dilated", "emb", "grouped", "mha", "norm"]
    assert config.target_modules == "conv1d|lin|seq_conv|conv2d"
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), model(TOKENS), rtol=0, atol=1e-4)


def test_an_embedding_without_biases_beside_it_is_lora(tmp_path: Path) -> None:
    model = tuned(["emb", "conv1d"])
    with torch.no_grad():  # no bias changed: no lora_bias, so the Embedding gets LoRA factors
        model.base_model.model.conv1d.bias.copy_(model.base_model.surgical_layers["conv1d"].base["bias"])
    lora = exported(model, tmp_path)
    config = lora.peft_config["default"]
    assert not config.lora_bias and config.modules_to_save is None
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert {"base_model.model.emb.lora_embedding_A", "base_model.model.emb.lora_embedding_B"} <= keys
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), model(TOKENS), rtol=0, atol=1e-4)


def test_only_modules_to_save(tmp_path: Path) -> None:
    model = tuned(["norm", "bn"])
    lora = exported(model, tmp_path)
    assert sorted(lora.peft_config["default"].modules_to_save) == ["bn", "norm"]
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), model(TOKENS), rtol=0, atol=1e-6)


def test_the_adapters_own_modules_to_save_are_carried(tmp_path: Path) -> None:
    model = get_peft_model(every_kind(), SurgicalConfig(target_modules=["lin"], modules_to_save=["norm"]))
    with torch.no_grad():
        model.base_model.model.norm.modules_to_save["default"].weight.mul_(2.0)
        model.base_model.model.lin.weight.add_(0.1)
    lora = exported(model, tmp_path)
    assert lora.peft_config["default"].modules_to_save == ["norm"]
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), model(TOKENS), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- rank
def test_a_lower_rank_is_smaller_and_approximate(tmp_path: Path) -> None:
    model = tuned(["lin", "seq_conv"])
    full, low = exported(model, tmp_path / "full"), exported(model, tmp_path / "low", rank=1)
    size = {name: (tmp_path / name / "adapter_model.safetensors").stat().st_size for name in ("full", "low")}
    assert size["low"] < size["full"] / 2
    with torch.no_grad():
        error = {
            name: (lora(TOKENS) - model(TOKENS)).abs().max().item() for name, lora in (("full", full), ("low", low))
        }
    assert error["full"] < 1e-4 < error["low"]


def test_int_rank_above_a_modules_rank_keeps_its_full_rank() -> None:
    model = tuned(["lin", "conv2d"])  # lin: rank up to 8; conv2d: a (2, 9) delta, rank up to 2
    config, state_dict = convert_to_lora(model, rank=6)
    assert config.r == 6 and config.rank_pattern == {"^conv2d": 2} and config.alpha_pattern == {"^conv2d": 2}
    assert state_dict["base_model.model.conv2d.lora_A.weight"].shape == (2, 1, 3, 3)
    assert state_dict["base_model.model.lin.lora_A.weight"].shape == (6, 8)


def test_float_rank_is_an_energy_threshold() -> None:
    model = tuned(["lin"])
    _, full = convert_to_lora(model, rank=1.0)
    config, partial = convert_to_lora(model, rank=0.5)
    kept = config.rank_pattern["^lin"]
    assert 1 <= kept < full["base_model.model.lin.lora_A.weight"].shape[0]
    assert partial["base_model.model.lin.lora_A.weight"].shape == (kept, 8)


@pytest.mark.parametrize("rank", [0, -1, 1.5, 0.0, True, "8"])
def test_a_rank_out_of_range_is_refused(rank: object, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"rank must be an int of at least 1 .* or a float in \(0, 1\]"):
        save_as_lora(tmp_path / "lora", tuned(["lin"]), rank=rank)
    assert not (tmp_path / "lora").exists()


# ------------------------------------------------------------------------------------------ PEFT's contract
def test_peft_s_converter_and_contract(tmp_path: Path) -> None:
    model = tuned(["lin"])
    layer = model.base_model.surgical_layers["lin"]
    assert model.supports_lora_conversion() and layer.supports_lora_conversion("default")
    torch.testing.assert_close(layer.get_delta_weight("default"), layer.delta("default")["weight"])
    config, _ = peft.convert_to_lora(model, rank=2)  # routed: PEFT's own would name the tuner's layers
    assert config.r == 2 and config.target_modules == "lin"
    peft.save_as_lora(tmp_path, model, rank=8)
    lora = PeftModel.from_pretrained(every_kind(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(lora(TOKENS), model(TOKENS), rtol=0, atol=1e-4)


def test_other_methods_still_convert_with_peft_s_own_converter() -> None:
    torch.manual_seed(0)
    loha = get_peft_model(nn.Sequential(nn.Linear(8, 8)), LoHaConfig(target_modules=["0"], init_weights=False))
    config, state_dict = peft.convert_to_lora(loha, rank=2)
    assert config.r == 2 and sorted(state_dict) == [
        "base_model.model.0.lora_A.weight",
        "base_model.model.0.lora_B.weight",
    ]


def test_a_layer_without_weight_has_no_delta_weight() -> None:
    model = tuned(["mha"])  # a container: its in_proj tensors have layers of their own
    layer = model.base_model.surgical_layers["mha/in_proj_weight"]
    with pytest.raises(InputError, match=r"tunes \['mha\.in_proj_weight'\], no `weight`: it has no delta weight"):
        layer.get_delta_weight("default")


# ------------------------------------------------------------------------------------------------ refusals
def test_unknown_adapter_and_non_surgical_models_are_refused() -> None:
    with pytest.raises(InputError, match=r"No adapter 'other' to convert\. Adapters: \['default'\]"):
        convert_to_lora(tuned(["lin"]), rank=2, adapter_name="other")
    with pytest.raises(InputError, match="this Sequential has none; other PEFT methods convert with peft"):
        convert_to_lora(nn.Sequential(nn.Linear(2, 2)), rank=2)


class OwnTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(8))
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + self.token)


def test_the_models_own_tensors_are_refused(tmp_path: Path) -> None:
    model = get_peft_model(OwnTensor(), SurgicalConfig(target_modules=["token", "lin"], init_weights=False))
    with pytest.raises(InputError, match=r"LoRA cannot express a change of the model's own tensors \['token'\]"):
        save_as_lora(tmp_path, model, rank=2)
    assert list(tmp_path.iterdir()) == []


def test_save_as_lora_keeps_other_files_and_replaces_a_previous_export(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    save_as_lora(tmp_path, tuned(["lin"]), rank=1)
    save_as_lora(tmp_path, tuned(["lin"]), rank=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "notes.txt",
    ]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 2
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_public_names() -> None:
    assert surgical_peft.convert_to_lora is convert_to_lora and surgical_peft.save_as_lora is save_as_lora
