"""Registration, delta adapter files, base fingerprints, atomic writes and bad adapter files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import peft.peft_model
import pytest
import torch
from peft import AutoPeftModel, PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

from surgical_peft import SurgicalConfig, list_blocks, save_adapter

WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def trained_adapter(model: nn.Module, block: str, train: Callable[..., None], path: Path, **config: Any) -> PeftModel:
    """`model` with a trained surgical adapter on `block`, saved to `path`."""
    peft_model = get_peft_model(model, SurgicalConfig(block=block, **config))
    train(peft_model)
    peft_model.save_pretrained(path)
    return peft_model


# --------------------------------------------------------------------------------------------------- registration
def test_registered_with_peft(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    peft_model = trained_adapter(make_model("resnet-basic"), "stage1", train, tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["README.md", "adapter_config.json", WEIGHTS]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SURGICAL"
    config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, SurgicalConfig)
    assert config.target_modules == ["resnet.encoder.stages.0"]
    assert config.verify_base is True
    for options in ({}, {"low_cpu_mem_usage": True}, {"torch_device": "cpu"}):
        loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path, **options)
        assert isinstance(loaded.peft_config["default"], SurgicalConfig)
        torch.testing.assert_close(logits_of(loaded), logits_of(peft_model), rtol=0, atol=1e-5)


def test_auto_peft_model_from_saved_base(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    # AutoPeftModel needs `base_model_name_or_path`, which PEFT only knows when the base was loaded from a directory
    # or the Hub; with no task_type it rebuilds the base from the `auto_mapping` that save_pretrained records.
    # peft 0.21 has no AutoPeftModelForImageClassification: AutoPeftModel is the class for vision models.
    make_model("vit").save_pretrained(tmp_path / "base")
    base = type(make_model("vit")).from_pretrained(tmp_path / "base")
    peft_model = trained_adapter(base, "layer2", train, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tmp_path / "base")
    assert config["auto_mapping"]["base_model_class"] == "ViTForImageClassification"
    loaded = AutoPeftModel.from_pretrained(str(tmp_path / "adapter"))
    assert isinstance(loaded, PeftModel)
    torch.testing.assert_close(logits_of(loaded), logits_of(peft_model), rtol=0, atol=1e-5)


def test_fresh_process_without_import_fails(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    # PEFT has no plugin discovery: a process must `import surgical_peft` before loading a surgical adapter.
    get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="head")).save_pretrained(tmp_path)
    script = f"from peft import PeftConfig; PeftConfig.from_pretrained({str(tmp_path)!r})"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "KeyError: 'SURGICAL'" in result.stderr


# -------------------------------------------------------------------------------------------------------- deltas
def test_untrained_adapter_saves_zero_deltas_of_the_block_only(
    arch: str, middle_block: str, make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    model = make_model(arch)
    blocks = list_blocks(model)
    expected = {PREFIX + name for name in model.state_dict() if blocks.block_of(name) == middle_block}
    get_peft_model(model, SurgicalConfig(block=middle_block)).save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert set(saved) == expected  # parameters and persistent buffers, nothing else
    assert all(not tensor.any() for tensor in saved.values())
    assert all(
        saved[PREFIX + name].dtype == tensor.dtype
        for name, tensor in model.state_dict().items()
        if PREFIX + name in saved
    )


def test_round_trip_reproduces_trained_model(
    arch: str,
    middle_block: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    peft_model = trained_adapter(make_model(arch), middle_block, train, tmp_path)
    tuned_logits = logits_of(peft_model)
    saved = load_file(tmp_path / WEIGHTS)
    assert any(tensor.any() for tensor in saved.values())
    loaded = PeftModel.from_pretrained(make_model(arch), tmp_path)
    torch.testing.assert_close(logits_of(loaded), tuned_logits, rtol=0, atol=1e-5)
    tuned_state = peft_model.base_model.model.state_dict()
    loaded_state = loaded.base_model.model.state_dict()
    for key in saved:  # running statistics included
        torch.testing.assert_close(loaded_state[key.removeprefix(PREFIX)], tuned_state[key.removeprefix(PREFIX)])


@pytest.mark.parametrize("block", ["embedder", "stage2"])
def test_batchnorm_statistics_after_training_in_train_mode(
    block: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    model = make_model("resnet-bottleneck")
    blocks = list_blocks(model)
    statistics = [name for name in model.state_dict() if name.endswith(("running_mean", "running_var", "tracked"))]
    before = {name: model.state_dict()[name].clone() for name in statistics}
    peft_model = trained_adapter(model, block, train, tmp_path)  # three steps in train() mode
    after = model.state_dict()
    saved = load_file(tmp_path / WEIGHTS)
    for name in statistics:
        if blocks.block_of(name) == block:  # trained, and saved as a delta
            assert not torch.equal(after[name], before[name]), name
            assert torch.equal(saved[PREFIX + name], after[name] - before[name])
            if name.endswith("num_batches_tracked"):
                assert saved[PREFIX + name].item() == 3
        else:  # frozen: never drifted
            assert torch.equal(after[name], before[name]), name
    loaded = PeftModel.from_pretrained(make_model("resnet-bottleneck"), tmp_path)
    loaded_state = loaded.base_model.model.state_dict()
    assert all(torch.allclose(loaded_state[name], after[name], rtol=0, atol=1e-6) for name in statistics)
    torch.testing.assert_close(logits_of(loaded), logits_of(peft_model), rtol=0, atol=1e-5)


def test_bfloat16_deltas_halve_the_parameter_bytes(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    model = make_model("resnet-basic")
    peft_model = trained_adapter(model, "stage2", train, tmp_path / "fp32")
    peft_model.peft_config["default"].delta_dtype = "bfloat16"
    peft_model.save_pretrained(tmp_path / "bf16")
    full, half = load_file(tmp_path / "fp32" / WEIGHTS), load_file(tmp_path / "bf16" / WEIGHTS)
    assert set(full) == set(half)

    buffers = {key for key in full if key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")}

    def nbytes(tensors: dict[str, torch.Tensor], keys: set[str]) -> int:
        return sum(tensors[key].numel() * tensors[key].element_size() for key in keys)

    parameters = set(full) - buffers
    assert nbytes(half, parameters) * 2 == nbytes(full, parameters)
    assert {half[key].dtype for key in parameters} == {torch.bfloat16}
    # BatchNorm statistics keep full precision: a shift can move them by orders of magnitude.
    assert all(half[key].dtype == full[key].dtype for key in buffers) and buffers
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "bf16")
    torch.testing.assert_close(logits_of(loaded), logits_of(peft_model), rtol=2e-2, atol=2e-2)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_invalid_delta_dtype() -> None:
    with pytest.raises(ValueError, match="Unknown delta_dtype 'int8'"):
        SurgicalConfig(block="stage1", delta_dtype="int8")


def test_adapter_name_does_not_change_the_files(
    make_model: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    for name in ("default", "noise"):
        torch.manual_seed(0)
        peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"), adapter_name=name)
        train(peft_model)
        peft_model.save_pretrained(tmp_path / name)
    default, noise = tmp_path / "default", tmp_path / "noise" / "noise"  # PEFT puts named adapters in a subfolder
    assert (default / WEIGHTS).read_bytes() == (noise / WEIGHTS).read_bytes()
    assert (default / "adapter_config.json").read_text() == (noise / "adapter_config.json").read_text()
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), default, adapter_name="noise")
    loaded.load_adapter(noise, adapter_name="other")
    loaded.set_adapter("other")


def test_several_adapters_save_and_load(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    peft_model = get_peft_model(make_model("vit"), SurgicalConfig(block="layer1"))
    train(peft_model)
    peft_model.add_adapter("second", SurgicalConfig(block="head"))
    peft_model.set_adapter("second")
    train(peft_model)
    expected = {}
    for name in ("default", "second"):
        peft_model.set_adapter(name)
        expected[name] = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model("vit"), tmp_path)
    loaded.load_adapter(tmp_path / "second", adapter_name="second")
    for name in ("second", "default", "second"):
        loaded.set_adapter(name)
        torch.testing.assert_close(logits_of(loaded), expected[name], rtol=0, atol=1e-5)


def test_modules_to_save_head_is_saved_in_full(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    def base_with_new_head(seed: int) -> nn.Module:
        model = make_model("resnet-basic", num_labels=5)  # the same backbone every time
        torch.manual_seed(seed)
        model.classifier[1] = nn.Linear(16, 5)  # a head newly initialised for five labels
        return model

    peft_model = trained_adapter(base_with_new_head(1), "stage2", train, tmp_path, modules_to_save=["classifier"])
    saved = load_file(tmp_path / WEIGHTS)
    head = {key for key in saved if key.startswith(f"{PREFIX}classifier.")}
    assert head == {f"{PREFIX}classifier.1.weight", f"{PREFIX}classifier.1.bias"}
    loaded = PeftModel.from_pretrained(base_with_new_head(2), tmp_path)  # its head differs: not fingerprinted
    torch.testing.assert_close(logits_of(loaded), logits_of(peft_model), rtol=0, atol=1e-5)


def test_adapters_with_and_without_modules_to_save(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    config = SurgicalConfig(block="stage1", modules_to_save=["classifier"])
    peft_model = get_peft_model(make_model("resnet-basic"), config, adapter_name="with_head")
    train(peft_model)
    peft_model.add_adapter("plain", SurgicalConfig(block="stage2"))  # fingerprinted while the head is wrapped
    peft_model.set_adapter("plain")
    train(peft_model)
    expected = {}
    for name in ("with_head", "plain"):
        peft_model.set_adapter(name)
        expected[name] = logits_of(peft_model)
    peft_model.save_pretrained(tmp_path, selected_adapters=["plain", "with_head"])
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == ["plain", "with_head"]
    for name in ("plain", "with_head"):
        loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / name)
        torch.testing.assert_close(logits_of(loaded), expected[name], rtol=0, atol=1e-5)


def test_continued_training_saves_deltas_from_the_base(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    trained_adapter(make_model("resnet-basic"), "stage1", train, tmp_path / "first")
    resumed = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "first", is_trainable=True)
    train(resumed)
    resumed.save_pretrained(tmp_path / "second")
    first, second = load_file(tmp_path / "first" / WEIGHTS), load_file(tmp_path / "second" / WEIGHTS)
    assert second[f"{PREFIX}resnet.encoder.stages.0.layers.0.layer.0.normalization.num_batches_tracked"] == 6
    assert all(not torch.equal(first[key], second[key]) for key in first)
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "second")
    torch.testing.assert_close(logits_of(loaded), logits_of(resumed), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------------- safety
def test_other_checkpoint_names_the_differing_block(
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1")).save_pretrained(tmp_path)
    other = make_model("resnet-basic")
    with torch.no_grad():
        other.resnet.encoder.stages[1].layers[0].shortcut.convolution.weight.add_(1e-3)
    before = take_snapshot(other)
    with pytest.raises(ValueError, match=r"block\(s\) stage2 differ") as error:
        PeftModel.from_pretrained(other, tmp_path)
    assert "verify_base=False" in str(error.value)
    assert_untouched(other, before)
    with pytest.raises(ValueError, match=r"block\(s\) embedder, stage1, stage2, head differ"):
        PeftModel.from_pretrained(make_model("resnet-basic", seed=1), tmp_path)


@pytest.mark.parametrize(
    ("other_arch", "overrides", "message"),
    [
        ("vit", {}, "trained on a ResNetForImageClassification, not a ViTForImageClassification"),
        ("resnet-basic", {"hidden_sizes": [8, 24]}, r"block\(s\) stage2, head differ"),
        ("resnet-basic", {"depths": [1, 2]}, r"block\(s\) stage2 differ"),
        ("resnet-bottleneck", {}, r"block\(s\) embedder, stage1, stage2, head differ"),
    ],
)
def test_other_architecture_or_shapes(
    other_arch: str,
    overrides: dict[str, Any],
    message: str,
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    original = make_model("resnet-basic")
    get_peft_model(original, SurgicalConfig(block="stage1")).save_pretrained(tmp_path)
    other = make_model(other_arch, **overrides)
    if other_arch == "resnet-basic":  # share every tensor that keeps its shape, to single out the blocks that differ
        shared = {k: v for k, v in original.state_dict().items() if v.shape == other.state_dict()[k].shape}
        other.load_state_dict(shared, strict=False)
    before = take_snapshot(other)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, before)


def test_verify_base_override(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    peft_model = trained_adapter(make_model("vit"), "layer1", train, tmp_path)
    deltas = load_file(tmp_path / WEIGHTS)
    config = SurgicalConfig.from_pretrained(tmp_path)
    config.verify_base = False
    other_base = make_model("vit", seed=1)
    base_state = {name: t.clone() for name, t in other_base.state_dict().items()}
    by_config = PeftModel.from_pretrained(other_base, tmp_path, config=config)
    by_kwarg = PeftModel.from_pretrained(make_model("vit", seed=1), tmp_path, verify_base=False)
    for loaded in (by_config, by_kwarg):
        state = loaded.base_model.model.state_dict()
        for key, delta in deltas.items():  # the deltas are applied to this base
            name = key.removeprefix(PREFIX)
            torch.testing.assert_close(state[name], base_state[name] + delta)
    torch.testing.assert_close(logits_of(by_config), logits_of(by_kwarg), rtol=0, atol=0)
    assert not torch.allclose(logits_of(by_config), logits_of(peft_model))
    # the override is a loading-time choice: it is never written back
    by_kwarg.save_pretrained(tmp_path / "again")
    assert "verify_base" not in json.loads((tmp_path / "again" / "adapter_config.json").read_text())


# ---------------------------------------------------------------------------------------------------- atomic save
def test_failed_save_keeps_the_previous_adapter(
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peft_model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1"))
    target = tmp_path / "adapters" / "noise"
    assert save_adapter(peft_model, target) == target
    previous = {path.name: path.read_bytes() for path in target.iterdir()}
    train(peft_model)

    def write_half_then_fail(tensors: dict[str, torch.Tensor], filename: str, **kwargs: Any) -> None:
        save_file(tensors, filename, **kwargs)
        with open(filename, "r+b") as file:
            file.truncate(os.path.getsize(filename) // 2)
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(peft_model, target)
    assert {path.name: path.read_bytes() for path in target.iterdir()} == previous
    assert [path.name for path in target.parent.iterdir()] == ["noise"]  # no staging directory left behind
    with pytest.raises(OSError, match="disk full"):
        save_adapter(peft_model, tmp_path / "adapters" / "new")
    assert [path.name for path in target.parent.iterdir()] == ["noise"]

    monkeypatch.undo()
    save_adapter(peft_model, target, write_extra=lambda staging: (staging / "NOTES.txt").write_text("shift: noise"))
    assert (target / "NOTES.txt").read_text() == "shift: noise"
    assert (target / WEIGHTS).read_bytes() != previous[WEIGHTS]
    assert sorted(path.name for path in target.parent.iterdir()) == ["noise"]


# ---------------------------------------------------------------------------------------------------- bad files
def rewrite(path: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


def first_float(tensors: dict[str, torch.Tensor]) -> str:
    return next(key for key, tensor in tensors.items() if tensor.is_floating_point())


BAD_FILES: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated": (
        lambda path: (path / WEIGHTS).write_bytes((path / WEIGHTS).read_bytes()[:-100]),
        "adapter_model.safetensors",
    ),
    "garbage": (lambda path: (path / WEIGHTS).write_bytes(b"\x00not a safetensors file"), "adapter_model.safetensors"),
    "wrong dtype": (
        lambda path: rewrite(path, lambda t: t.update({(k := first_float(t)): t[k].double()})),
        "has dtype torch.float64, expected torch.float32",
    ),
    "wrong shape": (
        lambda path: rewrite(path, lambda t: t.update({(k := first_float(t)): t[k].flatten()[:3]})),
        r"has shape \(3,\), the model's is",
    ),
    "missing key": (lambda path: rewrite(path, lambda t: t.pop(first_float(t))), "missing 1 tensor"),
    "extra key": (
        lambda path: rewrite(path, lambda t: t.update({f"{PREFIX}resnet.extra.weight": torch.zeros(2)})),
        "1 tensor\\(s\\) this model does not have",
    ),
}


@pytest.mark.parametrize("damage", list(BAD_FILES))
def test_bad_adapter_file_leaves_the_base_untouched(
    damage: str,
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained_adapter(make_model("resnet-basic"), "stage1", train, tmp_path)
    spoil, message = BAD_FILES[damage]
    spoil(tmp_path)
    base = make_model("resnet-basic")
    base.classifier[1].bias.requires_grad_(False)
    before = take_snapshot(base)
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def test_bad_second_adapter_leaves_the_first(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    trained_adapter(make_model("resnet-basic"), "stage1", train, tmp_path / "good")
    trained_adapter(make_model("resnet-basic"), "stage2", train, tmp_path / "bad")
    rewrite(tmp_path / "bad", lambda t: t.pop(first_float(t)))
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "good", is_trainable=True)
    expected = logits_of(loaded)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="missing 1 tensor"):
        loaded.load_adapter(tmp_path / "bad", adapter_name="bad")
    assert list(loaded.peft_config) == ["default"]
    assert loaded.active_adapters == ["default"]
    assert torch.equal(logits_of(loaded), expected)
    assert {name for name, p in loaded.named_parameters() if p.requires_grad} == trainable


def test_bad_file_for_an_existing_adapter_keeps_it(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    # As when the Trainer reloads its best checkpoint into the adapter it is training.
    peft_model = trained_adapter(make_model("resnet-basic"), "stage1", train, tmp_path)
    rewrite(tmp_path, lambda t: t.update({(k := first_float(t)): t[k][:1]}))
    expected = logits_of(peft_model)
    with pytest.raises(ValueError, match="has shape"):
        peft_model.load_adapter(tmp_path, adapter_name="default", is_trainable=True)
    assert list(peft_model.peft_config) == ["default"]
    assert torch.equal(logits_of(peft_model), expected)
    assert peft_model.get_nb_trainable_parameters()[0] == list_blocks(peft_model).num_parameters["stage1"]


def test_base_in_another_dtype_is_named(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    """An fp32-trained adapter on a bf16 copy of the same base: the error says the dtype is the difference."""
    get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1")).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"stored in float32, but this model is in bfloat16"):
        PeftModel.from_pretrained(make_model("resnet-basic").to(torch.bfloat16), tmp_path)
