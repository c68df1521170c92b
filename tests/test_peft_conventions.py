"""PEFT's conventions that its own test suite checks (`.ci/peft_conformance.py`): `init_weights` (True: zero deltas,
False: small random ones), the tuner-layer attributes, the merged state, direct injection refused clearly; and what
its config suite (`.ci/peft_conformance.py --suite config`) checks: a config reads without weights, and a JSON that is
no PEFT config raises PEFT's `TypeError`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model, get_peft_model_state_dict, inject_adapter_in_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from surgical_peft import SurgicalConfig, list_blocks
from surgical_peft.errors import InputError, NotAPeftConfigError

BLOCK = "stage1"


def _block_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> set[str]:
    blocks = list_blocks(model)
    return {name for name in state if blocks.block_of(name) == BLOCK}


def test_default_gives_zero_deltas(make_model: Callable[..., nn.Module], logits_of: Callable[..., Any]) -> None:
    base_logits = logits_of(make_model("resnet-basic"))
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK))
    assert peft_model.peft_config["default"].init_weights is True
    assert torch.equal(logits_of(peft_model), base_logits)
    assert all(not delta.any() for delta in get_peft_model_state_dict(peft_model).values())


def test_false_gives_small_random_parameter_deltas(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[[nn.Module], Any], logits_of: Callable[..., Any]
) -> None:
    model = make_model("resnet-basic")
    before = take_snapshot(model).tensors
    base_logits = logits_of(model)
    peft_model = get_peft_model(model, SurgicalConfig(block=BLOCK, init_weights=False))
    after = take_snapshot(model).tensors
    block = _block_tensors(model, before)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    parameters = {name for name, _ in model.named_parameters()}
    assert changed == block & parameters  # only the block's parameters: frozen blocks and BatchNorm statistics keep
    assert not torch.allclose(logits_of(peft_model), base_logits)
    for name in changed:  # noise of 2% of each tensor's own spread (1 for a constant tensor, e.g. BatchNorm weights)
        spread = before[name].std().item() if before[name].numel() > 1 else 0.0
        ratio = (after[name] - before[name]).std().item() / (spread if spread > 0 else 1.0)
        assert 0.005 < ratio < 0.05, (name, ratio)
    with peft_model.disable_adapter():  # the base is untouched underneath
        assert torch.equal(logits_of(peft_model), base_logits)


def test_false_is_seeded_by_torch_global_rng(make_model: Callable[..., nn.Module]) -> None:
    def deltas(seed: int) -> dict[str, torch.Tensor]:
        model = make_model("resnet-basic")  # the same base weights every time
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, SurgicalConfig(block=BLOCK, init_weights=False))
        return get_peft_model_state_dict(peft_model)

    first, again, other = deltas(0), deltas(0), deltas(1)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first)


def test_random_deltas_of_an_inactive_adapter(
    make_model: Callable[..., nn.Module], logits_of: Callable[..., Any]
) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK))
    zero_logits = logits_of(peft_model)
    peft_model.add_adapter("noisy", SurgicalConfig(block=BLOCK, init_weights=False))
    assert torch.equal(logits_of(peft_model), zero_logits)  # "default" stays active with its zero deltas
    peft_model.set_adapter("noisy")
    assert not torch.allclose(logits_of(peft_model), zero_logits)


def test_saved_random_adapter_loads_its_deltas(
    make_model: Callable[..., nn.Module], logits_of: Callable[..., Any], tmp_path: Path
) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK, init_weights=False))
    expected = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_weights"] is False
    torch.manual_seed(12345)  # loading draws no new noise: the saved deltas are what the model gets
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
    torch.testing.assert_close(logits_of(loaded), expected, rtol=0, atol=1e-5)


def test_adapter_saved_without_the_field_loads(
    make_model: Callable[..., nn.Module], logits_of: Callable[..., Any], train: Callable[..., None], tmp_path: Path
) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK))
    train(peft_model)
    expected = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    del saved["init_weights"]  # as written before the field existed
    config_file.write_text(json.dumps(saved))
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
    assert loaded.peft_config["default"].init_weights is True
    torch.testing.assert_close(logits_of(loaded), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("value", ["false", 0, None])
def test_init_weights_must_be_a_bool(value: object) -> None:
    with pytest.raises(InputError, match="init_weights must be True or False"):
        SurgicalConfig(block=BLOCK, init_weights=value)


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.conv1d = Conv1D(6, 4)
        self.conv = nn.Conv2d(6, 5, 1)
        self.norm = nn.LayerNorm(5)
        self.lin = nn.Linear(5, 3)


def test_layers_expose_the_base_layer_sizes() -> None:
    peft_model = get_peft_model(_Toy(), SurgicalConfig(target_modules=["emb", "conv1d", "conv", "norm", "lin"]))
    layers = peft_model.base_model.surgical_layers
    sizes = {key: (layer.in_features, layer.out_features) for key, layer in layers.items()}
    assert sizes == {"emb": (7, 4), "conv1d": (4, 6), "conv": (6, 5), "norm": (None, None), "lin": (5, 3)}
    assert all(layer.active_adapters == ["default"] and layer.adapter_layer_names == () for layer in layers.values())


def test_merged_state_as_in_peft(make_model: Callable[..., nn.Module], logits_of: Callable[..., Any]) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK, init_weights=False))
    peft_model.add_adapter("other", SurgicalConfig(block="stage2"))
    tuned_logits = logits_of(peft_model)
    peft_model.merge_adapter()
    assert peft_model.get_model_status().merged_adapters == ["default"]
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        peft_model.merge_adapter()
    with pytest.raises(InputError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        peft_model.delete_adapter("default")
    peft_model.delete_adapter("other")  # not merged: deleting it keeps the merge
    assert peft_model.get_model_status().merged_adapters == ["default"]
    assert torch.equal(logits_of(peft_model), tuned_logits)  # merging never changes the weights
    peft_model.unmerge_adapter()
    assert peft_model.get_model_status().merged_adapters == []
    assert torch.equal(logits_of(peft_model), tuned_logits)
    peft_model.delete_adapter("default")
    assert not peft_model.peft_config


def test_switching_away_ends_the_merge(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK))
    peft_model.add_adapter("other", SurgicalConfig(block="stage2"))
    peft_model.merge_adapter()
    with peft_model.disable_adapter():
        assert peft_model.get_model_status().merged_adapters == []
    peft_model.merge_adapter(["other"])
    assert peft_model.get_model_status().merged_adapters == ["other"]
    peft_model.set_adapter("default")
    assert peft_model.get_model_status().merged_adapters == []


def test_direct_injection_is_refused(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[..., Any], assert_untouched: Callable[..., None]
) -> None:
    model = make_model("resnet-basic")
    before = take_snapshot(model)
    with pytest.raises(ValueError, match=r"shared state.*get_peft_model"):
        inject_adapter_in_model(SurgicalConfig(block=BLOCK), model)
    assert_untouched(model, before)


# ------------------------------------------- PEFT's config suite: reading a config needs no weights (test_config.py)
def test_a_config_alone_reads_and_starts_a_new_adapter(
    make_model: Callable[..., nn.Module], logits_of: Callable[..., Any], tmp_path: Path
) -> None:
    SurgicalConfig(block=BLOCK, delta_dtype="bfloat16").save_pretrained(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter_config.json"]
    config = SurgicalConfig.from_pretrained(tmp_path)
    assert config.to_dict() == SurgicalConfig(block=BLOCK, delta_dtype="bfloat16").to_dict()
    assert config.saved_modules is None  # no weights file: nothing to read the modules from
    base_logits = logits_of(make_model("resnet-basic"))
    model = get_peft_model(make_model("resnet-basic"), config)  # a config template: a new adapter
    assert torch.equal(logits_of(model), base_logits)


def test_a_trained_adapters_config_without_its_weights_is_no_adapter(
    make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=BLOCK, init_weights=False)).save_pretrained(
        tmp_path
    )
    (tmp_path / "adapter_model.safetensors").unlink()
    config = SurgicalConfig.from_pretrained(tmp_path)  # reading it works
    assert config.base_fingerprint is not None
    with pytest.raises(InputError, match=r"holds no adapter_model\.safetensors .*set its base_fingerprint to None"):
        get_peft_model(make_model("resnet-basic"), config)
    config.base_fingerprint = None
    get_peft_model(make_model("resnet-basic"), config)


@pytest.mark.parametrize("reader", [SurgicalConfig, PeftConfig])
def test_a_json_that_is_no_peft_config_is_peft_s_type_error(reader: type[PeftConfig], tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"foo": "bar", "baz": 123}))
    message = f"The {reader.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}."
    with pytest.raises(TypeError, match=message) as error:
        reader.from_pretrained(tmp_path)
    assert isinstance(error.value, NotAPeftConfigError) and isinstance(error.value, InputError)
    assert str(error.value).startswith(str(tmp_path / "adapter_config.json"))
