"""Several adapters active at once, as PEFT users drive it (`model.base_model.set_adapter(["one", "two"])`).

Adapters on disjoint blocks train and infer together; adapters on the same block combine, for inference only, as the
base plus the sum of their deltas; training such a combination is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig, SurgicalModel, list_blocks
from surgical_peft.errors import InputError


def _two_adapters(model: nn.Module, first: str, second: str, **kwargs: Any) -> PeftModel:
    peft_model = get_peft_model(model, SurgicalConfig(block=first, **kwargs), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block=second, **kwargs))
    return peft_model


def _trainable_blocks(peft_model: PeftModel) -> set[str | None]:
    blocks = list_blocks(peft_model.get_base_model())
    named = peft_model.get_base_model().named_parameters()
    return {blocks.block_of(name) for name, parameter in named if parameter.requires_grad}


def _deltas(peft_model: PeftModel, adapter: str) -> dict[str, torch.Tensor]:
    tuner: SurgicalModel = peft_model.base_model
    return {
        f"{path}.{name}": delta
        for path in tuner._adapter_modules[adapter]
        for name, delta in tuner._layer(path).delta(adapter).items()
    }


def _same(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> bool:
    return tensors.keys() == expected.keys() and all(torch.equal(tensors[name], expected[name]) for name in expected)


def _same_state(state: Any, expected: Any) -> bool:
    return _same(state.tensors, expected.tensors) and state[1:] == expected[1:]


def test_disjoint_blocks_train_together_then_save_and_reload(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    take_snapshot: Callable[[nn.Module], Any],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    model = make_model("resnet-basic")
    base = take_snapshot(model).tensors
    peft_model = _two_adapters(model, "stage1", "stage2")
    peft_model.base_model.set_adapter(["one", "two"])
    assert peft_model.active_adapters == ["one", "two"]
    assert _trainable_blocks(peft_model) == {"stage1", "stage2"}
    train(peft_model)
    together = logits_of(peft_model)
    after = take_snapshot(model).tensors
    blocks = list_blocks(model)
    changed = {blocks.block_of(name) for name in base if not torch.equal(base[name], after[name])}
    assert changed == {"stage1", "stage2"}  # each adapter trained its own block, nothing else moved
    deltas = {name: _deltas(peft_model, name) for name in ("one", "two")}
    assert {blocks.block_of(key) for key in deltas["one"]} == {"stage1"}
    assert {blocks.block_of(key) for key in deltas["two"]} == {"stage2"}
    peft_model.save_pretrained(tmp_path)  # PEFT's layout: each named adapter in its own subfolder
    assert (tmp_path / "one" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "two" / "adapter_model.safetensors").is_file()

    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "one", adapter_name="one")
    loaded.load_adapter(tmp_path / "two", adapter_name="two")
    loaded.base_model.set_adapter(["one", "two"])
    torch.testing.assert_close(logits_of(loaded), together, rtol=0, atol=1e-6)
    for name in ("one", "two"):
        for key, delta in _deltas(loaded, name).items():
            torch.testing.assert_close(delta, deltas[name][key], rtol=0, atol=1e-7)
    reloaded = take_snapshot(loaded.get_base_model()).tensors
    for name, tensor in after.items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=1e-7)
    with loaded.disable_adapter():  # every active adapter off: exactly the base
        assert _same(take_snapshot(loaded.get_base_model()).tensors, base)
    torch.testing.assert_close(logits_of(loaded), together, rtol=0, atol=1e-6)
    assert _same(take_snapshot(loaded.unload()).tensors, base)


def test_same_block_infers_with_the_sum_of_the_deltas(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    take_snapshot: Callable[[nn.Module], Any],
) -> None:
    model = make_model("vit")
    base_logits = logits_of(model)
    torch.manual_seed(0)
    peft_model = _two_adapters(model, "layer1", "layer1", init_weights=False)  # random deltas, one per adapter
    one = logits_of(peft_model)
    deltas = {name: _deltas(peft_model, name) for name in ("one", "two")}
    tuner: SurgicalModel = peft_model.base_model
    peft_model.base_model.set_adapter(["one", "two"])
    state = model.state_dict()
    for key, delta in deltas["one"].items():
        path, _, name = key.rpartition(".")
        assert torch.equal(state[key], tuner._layer(path).base[name] + (delta + deltas["two"][key]))
    expected = make_model("vit")  # a plain model given base + delta_one + delta_two by hand
    with torch.no_grad():
        for key, delta in deltas["one"].items():
            expected.get_parameter(key).add_(delta + deltas["two"][key])
    summed = logits_of(expected)
    assert torch.equal(logits_of(peft_model), summed)
    assert not torch.equal(summed, one)
    assert not any(parameter.requires_grad for parameter in peft_model.parameters())  # the sum is frozen
    layers = tuner.surgical_layers.values()
    assert all(layer.active_adapters == ["one", "two"] and layer.loaded == ("one", "two") for layer in layers)
    stashed = [t for layer in tuner.surgical_layers.values() for d in layer.stashed.values() for t in d.values()]
    assert stashed and {t.device.type for t in stashed} == {"cpu"}  # each adapter's own weights stay on the CPU
    with peft_model.disable_adapter():
        assert torch.equal(logits_of(peft_model), base_logits)
    assert torch.equal(logits_of(peft_model), summed)
    peft_model.base_model.set_adapter("one")  # back to one adapter: exactly its weights
    assert torch.equal(logits_of(peft_model), one)
    peft_model.base_model.set_adapter(["one", "two"])
    merged = peft_model.merge_and_unload()
    assert torch.equal(logits_of(merged), summed)
    assert not hasattr(merged, "peft_config")


def test_unload_with_several_active_gives_the_base(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[[nn.Module], Any]
) -> None:
    model = make_model("vit")
    base = take_snapshot(model).tensors
    peft_model = _two_adapters(model, "layer1", "layer1", init_weights=False)
    peft_model.add_adapter("three", SurgicalConfig(block="head", init_weights=False))
    peft_model.base_model.set_adapter(["one", "two", "three"])
    assert _same(take_snapshot(peft_model.unload()).tensors, base)


def test_training_a_same_block_combination_is_refused(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[[nn.Module], Any]
) -> None:
    peft_model = _two_adapters(make_model("vit"), ["layer1", "layer2"], "layer2", init_weights=False)
    peft_model.base_model.set_adapter(["one", "two"])
    assert _trainable_blocks(peft_model) == {"layer1"}  # only "one" tunes layer1; layer2 holds the sum, frozen
    before = take_snapshot(peft_model)
    message = r"Adapters \['one', 'two'\] are active together and tune the same block\(s\) \['layer2'\]"
    with pytest.raises(InputError, match=message):
        peft_model.train()
    with pytest.raises(InputError, match=message):
        peft_model.set_requires_grad("two")
    assert not peft_model.get_base_model().training
    assert _same_state(take_snapshot(peft_model), before)
    assert peft_model.peft_config["two"].inference_mode is False
    peft_model.base_model.set_adapter("two")
    peft_model.train()  # one adapter at a time trains again
    assert _trainable_blocks(peft_model) == {"layer2"}
    with pytest.warns(UserWarning, match=message):  # activated in train mode: said at once
        peft_model.base_model.set_adapter(["one", "two"])


def test_delete_an_active_adapter(
    make_model: Callable[..., nn.Module], logits_of: Callable[[nn.Module], torch.Tensor]
) -> None:
    peft_model = _two_adapters(make_model("vit"), "layer1", "layer1", init_weights=False)
    peft_model.set_adapter("two")
    two = logits_of(peft_model)
    peft_model.base_model.set_adapter(["one", "two"])
    peft_model.delete_adapter("one")
    assert peft_model.active_adapters == ["two"]
    assert torch.equal(logits_of(peft_model), two)
    assert _trainable_blocks(peft_model) == {"layer1"}
    layers = peft_model.base_model.surgical_layers.values()
    assert all(layer.loaded == ("two",) and layer.active_adapters == ["two"] for layer in layers)


def test_wrong_names_are_refused_and_change_nothing(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[[nn.Module], Any]
) -> None:
    peft_model = _two_adapters(make_model("vit"), "layer1", "layer2", init_weights=False)
    before = take_snapshot(peft_model)
    with pytest.raises(InputError, match=r"\['three'\] not found. Available: \['one', 'two'\]"):
        peft_model.base_model.set_adapter(["one", "three"])
    with pytest.raises(InputError, match=r"repeat in \['one', 'one'\]. Available: \['one', 'two'\]"):
        peft_model.base_model.set_adapter(["one", "one"])
    assert _same_state(take_snapshot(peft_model), before)
    assert peft_model.active_adapters == ["one"]


class _MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.lin1(self.lin0(x)))


def test_peft_check_on_shared_modules_to_save_comes_first(take_snapshot: Callable[[nn.Module], Any]) -> None:
    peft_model = get_peft_model(_MLP(), SurgicalConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    peft_model.add_adapter("other", SurgicalConfig(target_modules=["lin0"], modules_to_save=["lin1"]))
    before = take_snapshot(peft_model)
    with pytest.raises(ValueError, match="Only one adapter can be set at a time for ModulesToSaveWrapper"):
        peft_model.base_model.set_adapter(["default", "other"])
    assert _same_state(take_snapshot(peft_model), before)
    assert peft_model.active_adapters == ["default"]


def test_weighted_adapter_is_the_weighted_sum_of_the_deltas(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    peft_model = _two_adapters(make_model("vit"), "layer1", ["layer1", "head"], init_weights=False)
    peft_model.base_model.set_adapter(["one", "two"])
    summed = logits_of(peft_model)
    peft_model.add_weighted_adapter(["one", "two"], [1.0, 1.0], "sum")
    peft_model.add_weighted_adapter(["one", "two"], [0.5, -2.0], "mix")
    assert peft_model.active_adapters == ["one", "two"]  # new adapters start inactive
    peft_model.set_adapter("sum")
    assert torch.equal(logits_of(peft_model), summed)
    deltas = {name: _deltas(peft_model, name) for name in ("one", "two", "mix")}
    assert deltas["mix"].keys() == deltas["two"].keys()  # every module either tunes
    for key, delta in deltas["mix"].items():
        expected = 0.5 * deltas["one"].get(key, torch.zeros_like(delta)) + -2.0 * deltas["two"][key]
        torch.testing.assert_close(delta, expected, rtol=0, atol=1e-7)
    peft_model.set_adapter("mix")
    assert _trainable_blocks(peft_model) == {"layer1", "head"}
    train(peft_model)
    trained = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path, selected_adapters=["mix"])
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path / "mix", adapter_name="mix")
    torch.testing.assert_close(logits_of(loaded), trained, rtol=0, atol=1e-6)


def test_weighted_adapter_refuses_bad_input(
    make_model: Callable[..., nn.Module], take_snapshot: Callable[[nn.Module], Any]
) -> None:
    peft_model = _two_adapters(make_model("vit"), "layer1", "layer2")
    peft_model.add_adapter("full", SurgicalConfig(block="layer1", modules_to_save=["classifier"]))
    before = take_snapshot(peft_model)
    calls = {
        r"\['three'\] cannot be combined. Available: \['one', 'two', 'full'\]": (["one", "three"], [1, 1]),
        r"1 weights given for 2 adapters": (["one", "two"], [1]),
        r"Adapter 'one' already exists": (["one", "two"], [1, 1], "one"),
        r"Adapters \['full'\] have modules_to_save": (["one", "full"], [1, 1]),
    }
    for message, (adapters, weights, *name) in calls.items():
        with pytest.raises(InputError, match=message):
            peft_model.add_weighted_adapter(adapters, weights, *(name or ["new"]))
    assert list(peft_model.peft_config) == ["one", "two", "full"]
    assert _same_state(take_snapshot(peft_model), before)
