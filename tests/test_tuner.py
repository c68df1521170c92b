"""The tuner as PEFT users drive it: training in place, adapters, disabling, merging, unloading, dtypes.

Mirrors the generic checks PEFT's own `tests/testing_common.py` runs on every method.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import build_model
from peft import PeftModel, get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig, SurgicalModel, list_blocks


def test_only_the_block_is_trainable(arch: str, middle_block: str, make_model: Callable[..., nn.Module]) -> None:
    model = make_model(arch)
    peft_model = get_peft_model(model, SurgicalConfig(block=middle_block))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    blocks = list_blocks(model)
    assert trainable == {name for name, _ in model.named_parameters() if blocks.block_of(name) == middle_block}
    assert peft_model.get_nb_trainable_parameters() == (blocks.num_parameters[middle_block], model.num_parameters())
    # PEFT's naming: the PeftModel lists the tuned parameters (the model's own) under the tuner prefix and the adapter
    listed = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    assert len(listed) == len(trainable) and all(".tuned.default." in name for name in listed)
    assert all(name.startswith("base_model.surgical_layers.") for name in listed)
    # nothing is added to the model: its state dict and forward are its own (the PeftModel's also names them there)
    own = [name for name in peft_model.state_dict() if name.startswith("base_model.model.")]
    assert own == [f"base_model.model.{name}" for name in model.state_dict()]


def test_training_changes_only_the_block(
    arch: str,
    middle_block: str,
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    train: Callable[..., None],
) -> None:
    model = make_model(arch)
    before = take_snapshot(model).tensors
    peft_model = get_peft_model(model, SurgicalConfig(block=middle_block))
    train(peft_model)
    after = take_snapshot(model).tensors
    blocks = list_blocks(model)
    block = {name for name in before if blocks.block_of(name) == middle_block}
    frozen_changed = [name for name in before if name not in block and not torch.equal(before[name], after[name])]
    assert not frozen_changed  # frozen BatchNorm statistics included: they never drift in train()
    assert any(not torch.equal(before[name], after[name]) for name in block)
    if arch.startswith("resnet"):  # the tuned block's own BatchNorm statistics train
        running = [name for name in block if name.endswith("running_mean")]
        assert running and all(not torch.equal(before[name], after[name]) for name in running)


def test_only_tuned_batchnorm_trains(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block="stage2"))

    def training_norms() -> set[str]:
        modules = peft_model.base_model.model.named_modules()
        return {name.split(".layers.")[0] for name, m in modules if isinstance(m, nn.BatchNorm2d) and m.training}

    assert training_norms() == set()  # the model was in eval mode, and stays so
    peft_model.train()
    assert training_norms() == {"resnet.encoder.stages.0"}
    peft_model.set_adapter("two")
    assert training_norms() == {"resnet.encoder.stages.1"}
    with peft_model.disable_adapter():
        assert training_norms() == set()
        peft_model.train()
        assert training_norms() == set()
    assert training_norms() == {"resnet.encoder.stages.1"}
    peft_model.eval()
    assert not any(m.training for m in peft_model.modules())
    peft_model.train()
    assert peft_model.unload().training
    assert all(m.training for m in peft_model.modules())  # norms are released with the rest of the model


def test_disable_adapter_gives_exactly_the_base(
    arch: str,
    middle_block: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    model = make_model(arch)
    base_logits = logits_of(model)
    peft_model = get_peft_model(model, SurgicalConfig(block=middle_block))
    train(peft_model)
    tuned_logits = logits_of(peft_model)
    assert not torch.equal(tuned_logits, base_logits)
    with peft_model.disable_adapter():
        assert torch.equal(logits_of(peft_model), base_logits)
        assert not any(p.requires_grad for p in peft_model.parameters())
    assert torch.equal(logits_of(peft_model), tuned_logits)
    assert peft_model.get_nb_trainable_parameters()[0] == list_blocks(model).num_parameters[middle_block]


def test_several_adapters_switch_exactly(
    arch: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    model = make_model(arch)
    base_logits = logits_of(model)
    first, second = list(list_blocks(model))[:2]
    peft_model = get_peft_model(model, SurgicalConfig(block=first), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block=second))
    assert peft_model.active_adapters == ["one"]
    train(peft_model)
    a_logits = logits_of(peft_model)
    peft_model.set_adapter("two")
    assert torch.equal(logits_of(peft_model), base_logits)  # "two" is untrained; "one" is stashed
    train(peft_model)
    b_logits = logits_of(peft_model)
    for _ in range(2):
        peft_model.set_adapter("one")
        assert torch.equal(logits_of(peft_model), a_logits)
        peft_model.set_adapter("two")
        assert torch.equal(logits_of(peft_model), b_logits)
    tuner: SurgicalModel = peft_model.base_model
    stashed = [t for layer in tuner.surgical_layers.values() for d in layer.stashed.values() for t in d.values()]
    snapshots = [t for layer in tuner.surgical_layers.values() for t in layer.base.values()]
    assert stashed and snapshots
    assert {t.device.type for t in stashed + snapshots} == {"cpu"}
    with pytest.raises(ValueError, match="not found"):
        peft_model.set_adapter("three")


def test_set_adapter_makes_only_the_new_block_trainable(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer1"), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block="layer2"))
    peft_model.set_adapter("two")
    trainable = {name for name, p in peft_model.base_model.model.named_parameters() if p.requires_grad}
    assert trainable and all(".layers.1." in name for name in trainable)


def test_delete_adapter(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    model = make_model("resnet-basic")
    base_logits = logits_of(model)
    peft_model = get_peft_model(model, SurgicalConfig(block="stage1"), adapter_name="one")
    train(peft_model)
    a_logits = logits_of(peft_model)
    peft_model.add_adapter("two", SurgicalConfig(block="stage1"))
    peft_model.set_adapter("two")
    train(peft_model)
    peft_model.delete_adapter("two")
    assert list(peft_model.peft_config) == ["one"]
    assert peft_model.active_adapters == ["one"]
    assert torch.equal(logits_of(peft_model), a_logits)
    tuner: SurgicalModel = peft_model.base_model
    assert all(layer.adapters == {"one"} and not layer.stashed for layer in tuner.surgical_layers.values())
    peft_model.add_adapter("three", SurgicalConfig(block="head"))
    peft_model.set_adapter("three")
    peft_model.delete_adapter("one")
    assert torch.equal(logits_of(peft_model), base_logits)
    assert all(key.startswith("classifier") for key in tuner.surgical_layers)
    with pytest.raises(ValueError, match="does not exist"):
        peft_model.delete_adapter("one")


def test_failed_add_adapter_keeps_the_others(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    peft_model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer1"))
    train(peft_model)
    expected = logits_of(peft_model)
    trainable = {name for name, p in peft_model.named_parameters() if p.requires_grad}
    bad = {
        "not found in the base model": SurgicalConfig(target_modules=["nope"]),
        "Unknown block 'stage1'": SurgicalConfig(block="stage1"),
        "hold no tensors": SurgicalConfig(target_modules=["dropout"]),
    }
    for message, config in bad.items():
        with pytest.raises(ValueError, match=message):
            peft_model.add_adapter("new", config)
        assert list(peft_model.peft_config) == ["default"]
        assert peft_model.active_adapters == ["default"]
        assert {name for name, p in peft_model.named_parameters() if p.requires_grad} == trainable
        assert torch.equal(logits_of(peft_model), expected)
    peft_model.add_adapter("new", SurgicalConfig(block="layer2"))  # the name is free again


def test_merge_and_unload_returns_plain_tuned_model(
    arch: str,
    middle_block: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    train: Callable[..., None],
) -> None:
    model = make_model(arch)
    model_class = type(model)
    peft_model = get_peft_model(model, SurgicalConfig(block=middle_block))
    train(peft_model)
    tuned_logits = logits_of(peft_model)
    tuned = take_snapshot(model)._replace(requires_grad=take_snapshot(make_model(arch)).requires_grad)
    merged = peft_model.merge_and_unload()
    assert merged is model and type(merged) is model_class
    assert_untouched(merged, tuned)  # the tuned weights, every requires_grad flag back, no PEFT attribute or hook
    assert torch.equal(logits_of(merged), tuned_logits)
    merged.train()  # BatchNorm is no longer held in eval mode by the tuner
    assert all(module.training for module in merged.modules())


def test_merge_and_unload_picks_adapter(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"), adapter_name="one")
    train(peft_model)
    a_logits = logits_of(peft_model)
    peft_model.add_adapter("two", SurgicalConfig(block="stage2"))
    peft_model.set_adapter("two")
    train(peft_model)
    merged = peft_model.merge_and_unload(adapter_names=["one"], safe_merge=True)
    assert torch.equal(logits_of(merged), a_logits)


def test_unload_returns_the_untouched_base(
    arch: str,
    middle_block: str,
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    train: Callable[..., None],
) -> None:
    model = make_model(arch)
    list(model.parameters())[-1].requires_grad_(False)  # a user's own choice, restored as it was
    before = take_snapshot(model)
    peft_model = get_peft_model(model, SurgicalConfig(block=middle_block))
    train(peft_model)
    peft_model.add_adapter("other", SurgicalConfig(block="head"))
    unloaded = peft_model.unload()
    assert unloaded is model
    assert_untouched(unloaded, before)


def test_merge_unmerge_is_idempotent(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    peft_model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer2"))
    train(peft_model)
    tuned_logits = logits_of(peft_model)
    for _ in range(2):
        peft_model.merge_adapter()
        assert torch.equal(logits_of(peft_model), tuned_logits)
    for _ in range(2):
        peft_model.unmerge_adapter()
        assert torch.equal(logits_of(peft_model), tuned_logits)
    merged = peft_model.merge_and_unload()
    assert torch.equal(logits_of(merged), tuned_logits)


def test_safe_merge_refuses_nan_weights(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer1"))
    peft_model.merge_adapter(safe_merge=True)
    with torch.no_grad():
        peft_model.base_model.model.vit.layers[0].mlp.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaNs detected in the weights of adapter 'default' \(vit.layers.0"):
        peft_model.merge_and_unload(safe_merge=True)
    assert torch.isnan(peft_model.merge_and_unload().vit.layers[0].mlp.fc2.weight).any()


def test_gradient_checkpointing(
    make_model: Callable[..., nn.Module], pixel_values: torch.Tensor, labels: torch.Tensor
) -> None:
    model = make_model("vit")
    model.gradient_checkpointing_enable()
    peft_model = get_peft_model(model, SurgicalConfig(block="layer2"))
    peft_model.train()
    peft_model(pixel_values=pixel_values, labels=labels).loss.backward()
    with_grad = {name for name, p in peft_model.base_model.model.named_parameters() if p.grad is not None}
    assert with_grad == {name for name, p in peft_model.base_model.model.named_parameters() if p.requires_grad}
    assert all(".layers.1." in name for name in with_grad)


def test_model_status(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"), adapter_name="one")
    peft_model.add_adapter("two", SurgicalConfig(block="head"))
    status = peft_model.get_model_status()
    assert status.peft_types == {"one": "SURGICAL", "two": "SURGICAL"}
    assert status.active_adapters == ["one"]
    assert status.available_adapters == ["one", "two"]
    assert status.enabled is True
    with peft_model.disable_adapter():
        assert peft_model.get_model_status().enabled is False


def test_modules_to_save_head(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    train: Callable[..., None],
) -> None:
    model = make_model("resnet-basic", num_labels=5)  # a head for another task, freshly initialised
    before = take_snapshot(model)
    base_logits = logits_of(model)
    peft_model = get_peft_model(model, SurgicalConfig(block="stage1", modules_to_save=["classifier"]))
    plain = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1")).peft_config["default"]
    recorded = peft_model.peft_config["default"].base_fingerprint["blocks"]
    assert recorded["head"] != plain.base_fingerprint["blocks"]["head"]  # the head is not fingerprinted ...
    assert {k: v for k, v in recorded.items() if k != "head"} == {  # ... the backbone is
        k: v for k, v in plain.base_fingerprint["blocks"].items() if k != "head"
    }
    trainable = {name for name, p in peft_model.base_model.model.named_parameters() if p.requires_grad}
    assert {name.split(".")[0] for name in trainable} == {"resnet", "classifier"}
    assert all(".modules_to_save.default." in name for name in trainable if name.startswith("classifier."))
    train(peft_model)
    tuned_logits = logits_of(peft_model)
    peft_model.add_adapter("other", SurgicalConfig(block="stage2", modules_to_save=["classifier"]))
    peft_model.set_adapter("other")
    assert torch.equal(logits_of(peft_model), base_logits)  # a fresh copy of the head, and stage1 stashed
    train(peft_model)
    other_logits = logits_of(peft_model)
    peft_model.set_adapter("default")
    assert torch.equal(logits_of(peft_model), tuned_logits)
    with peft_model.disable_adapter():
        assert torch.equal(logits_of(peft_model), base_logits)
    peft_model.delete_adapter("default")
    assert torch.equal(logits_of(peft_model), other_logits)
    assert peft_model.unload() is model
    assert_untouched(model, before)


def test_merge_and_unload_with_modules_to_save(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
) -> None:
    model = make_model("vit")
    peft_model = get_peft_model(model, SurgicalConfig(block="layer2", modules_to_save=["classifier"]))
    train(peft_model)
    tuned_logits = logits_of(peft_model)
    merged = peft_model.merge_and_unload()
    assert type(merged.classifier) is nn.Linear
    assert not hasattr(merged, "peft_config")
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.equal(logits_of(merged), tuned_logits)


def test_inference_mode_freezes_everything(make_model: Callable[..., nn.Module]) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1", inference_mode=True))
    assert not any(p.requires_grad for p in peft_model.parameters())
    peft_model.base_model.set_requires_grad("default")
    assert peft_model.get_nb_trainable_parameters()[0] == list_blocks(peft_model).num_parameters["stage1"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(
    arch: str,
    middle_block: str,
    dtype: torch.dtype,
    make_model: Callable[..., nn.Module],
    pixel_values: torch.Tensor,
    train: Callable[..., None],
) -> None:
    peft_model = get_peft_model(make_model(arch), SurgicalConfig(block=middle_block))
    train(peft_model, steps=1)
    peft_model = peft_model.to(dtype)
    try:
        with torch.no_grad():
            logits = peft_model(pixel_values=pixel_values.to(dtype)).logits
    except RuntimeError as error:  # some CPU kernels have no float16 implementation
        if dtype is torch.float16 and "not implemented for 'Half'" in str(error):
            pytest.skip(f"{arch}: float16 forward is not supported on this CPU build: {error}")
        raise
    assert logits.dtype == dtype and torch.isfinite(logits).all()
    with peft_model.disable_adapter(), torch.no_grad():
        assert peft_model(pixel_values=pixel_values.to(dtype)).logits.dtype == dtype
    assert {p.dtype for p in peft_model.parameters()} == {dtype}


def test_loaded_adapter_is_frozen_unless_trainable(make_model: Callable[..., nn.Module], tmp_path) -> None:
    get_peft_model(make_model("vit"), SurgicalConfig(block="layer1")).save_pretrained(tmp_path)
    frozen = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0
    trainable = PeftModel.from_pretrained(make_model("vit"), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters()[0] == list_blocks(trainable).num_parameters["layer1"]


class _TokenNet(nn.Module):
    """A container that owns a tensor beside its blocks, as a timm ViT owns `cls_token` and `pos_embed`."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 4))
        self.blocks = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x + self.cls_token))


def _token_net(seed: int) -> _TokenNet:
    torch.manual_seed(seed)
    return _TokenNet()


@pytest.mark.parametrize("target_modules", [["cls_token", "head"], "cls_token|head"], ids=["list", "regex"])
def test_a_containers_own_tensor_is_a_target_by_itself(target_modules: Any, tmp_path: Any) -> None:
    # The root owns cls_token beside its blocks: a target of its own (a layer keyed by its tensor path), so tuning
    # it leaves the root's children frozen, and it saves, loads and combines exactly.
    model = get_peft_model(_token_net(0), SurgicalConfig(target_modules=target_modules))
    trainable = {name for name, p in model.base_model.model.named_parameters() if p.requires_grad}
    assert trainable == {"cls_token", "head.weight", "head.bias"}
    assert set(model.base_model.surgical_layers) == {"cls_token", "head"}
    inputs = torch.randn(8, 4)
    before = _token_net(0).state_dict()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(inputs).sum().backward()
    optimizer.step()
    changed = {
        name for name, tensor in model.base_model.model.state_dict().items() if not torch.equal(tensor, before[name])
    }
    assert changed == trainable
    tuned = model(inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_token_net(0), tmp_path)
    assert torch.equal(loaded(inputs), tuned)
    with model.disable_adapter():
        assert torch.equal(model.base_model.model.cls_token, before["cls_token"])
    model.add_weighted_adapter(["default"], [2.0], "double")
    layer = model.base_model.surgical_layers["cls_token"]
    torch.testing.assert_close(layer.delta("double")["cls_token"], 2 * layer.delta("default")["cls_token"])
    with pytest.raises(ValueError, match="differ"):  # another base is refused
        PeftModel.from_pretrained(_token_net(1), tmp_path)


def test_a_container_module_target_tunes_its_tensors_one_layer_each() -> None:
    # transformers' ViTEmbeddings owns cls_token and position_embeddings beside its patch embedding: tuning the
    # embeddings block gives each of its own tensors a layer, so another adapter can target one of them alone.
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2)
    model = get_peft_model(ViTForImageClassification(config), SurgicalConfig(block="embeddings"), adapter_name="all")
    model.add_adapter("token", SurgicalConfig(target_modules=["vit.embeddings.cls_token"]))
    layers = model.base_model.surgical_layers
    assert {"vit/embeddings/cls_token", "vit/embeddings/position_embeddings"} <= set(layers)
    assert layers["vit/embeddings/cls_token"].adapters == {"all", "token"}
    model.base_model.set_adapter("token")
    trainable = {name for name, p in model.base_model.model.named_parameters() if p.requires_grad}
    assert trainable == {"vit.embeddings.cls_token"}


def test_a_new_head_alone_is_an_adapter_of_its_full_copy(tmp_path: Path) -> None:
    """`block="head"` with the head in `modules_to_save` (a new head, e.g. for other labels): the adapter holds the
    head's full copy and nothing else; it trains, saves, reloads and merges to the same outputs."""
    base = build_model("resnet-basic")
    pixels = torch.randn(4, 3, 16, 16)
    model = get_peft_model(copy.deepcopy(base), SurgicalConfig(block="head", modules_to_save=["classifier"]))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == [
        f"base_model.model.classifier.modules_to_save.default.1.{name}" for name in ("weight", "bias")
    ]
    model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    model.eval()
    tuned = model(pixel_values=pixels).logits
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert torch.equal(loaded(pixel_values=pixels).logits, tuned)
    assert torch.equal(loaded.merge_and_unload()(pixel_values=pixels).logits, tuned)
    assert not torch.equal(base(pixel_values=pixels).logits, tuned)
