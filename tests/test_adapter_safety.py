"""Adapter files under attack (issue 12): saves that lose nothing, kills mid-save, non-finite or damaged tensors,
failed loads that leave the model as it was, tampered configs, and fingerprints that an edit cannot bypass."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from safetensors.torch import load_file, save_file
from torch import nn

from surgical_peft import SurgicalConfig, save_adapter
from surgical_peft.errors import InputError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
ADAPTER_FILES = ["README.md", CONFIG, WEIGHTS]
TRACKED = f"{PREFIX}resnet.encoder.stages.0.layers.0.layer.0.normalization.num_batches_tracked"
RUNNING_VAR = f"{PREFIX}resnet.encoder.stages.0.layers.0.layer.0.normalization.running_var"


@pytest.fixture
def trained(make_model: Callable[..., nn.Module], train: Callable[..., None]) -> Callable[..., PeftModel]:
    """`trained(block="stage1", **config)`: a tiny ResNet with a trained surgical adapter."""

    def trained(block: str | None = "stage1", **config: Any) -> PeftModel:
        model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block=block, **config))
        train(model)
        return model

    return trained


def edit_config(directory: Path, **changes: Any) -> None:
    config = json.loads((directory / CONFIG).read_text())
    config.update(changes)
    (directory / CONFIG).write_text(json.dumps(config))


def rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors of an adapter file and write them back unsealed (as PEFT's own save_pretrained does)."""
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def attributes(model: nn.Module) -> dict[str, set[str]]:
    return {name: set(vars(module)) for name, module in model.named_modules()}


# ------------------------------------------------------------------------------------ 1: save writes only its files
def test_save_keeps_everything_else_in_the_directory(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    (tmp_path / "train_log.txt").write_text("epoch 1")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "images.csv").write_text("a,b")
    (tmp_path / "README.md").write_text("mine")
    model = trained()
    for _ in range(2):  # a first save and a replacement
        assert save_adapter(model, tmp_path) == tmp_path
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*ADAPTER_FILES, "data", "train_log.txt"])
    assert (tmp_path / "train_log.txt").read_text() == "epoch 1"
    assert (tmp_path / "data" / "images.csv").read_text() == "a,b"
    assert "peft" in (tmp_path / "README.md").read_text()  # README.md is the adapter's model card


def test_save_into_the_working_directory(
    trained: Callable[..., PeftModel], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("kept")
    model = trained()
    save_adapter(model, ".")
    save_adapter(model, os.getcwd())
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([*ADAPTER_FILES, "notes.txt"])


def test_save_refuses_a_file_and_a_pickle(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    target.write_text("a regular file")
    with pytest.raises(InputError, match=r"adapter: it exists and is not a directory"):
        save_adapter(trained(), target)
    assert target.read_text() == "a regular file"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]
    with pytest.raises(InputError, match="safe_serialization=False"):
        save_adapter(trained(), tmp_path / "other", safe_serialization=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["adapter"]


def test_save_refuses_a_model_without_an_adapter(make_model: Callable[..., nn.Module], tmp_path: Path) -> None:
    with pytest.raises(InputError, match="ResNetForImageClassification is not a PeftModel"):
        save_adapter(make_model("resnet-basic"), tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()


def test_save_refuses_a_directory_of_yours_in_place_of_its_files(
    trained: Callable[..., PeftModel], tmp_path: Path
) -> None:
    model = trained()
    save_adapter(model, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in (WEIGHTS, CONFIG)}
    (tmp_path / "README.md").unlink()
    (tmp_path / "README.md").mkdir()  # the user's own directory, where the card would go
    (tmp_path / "README.md" / "notes.txt").write_text("mine")
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)  # a save that would change the weights
    with pytest.raises(InputError, match=r"README\.md is a directory of yours in the way\. Nothing was written"):
        save_adapter(model, tmp_path)
    assert {name: (tmp_path / name).read_bytes() for name in (WEIGHTS, CONFIG)} == before
    assert (tmp_path / "README.md" / "notes.txt").read_text() == "mine"
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(ADAPTER_FILES)  # no staging left


def test_write_extra_files_are_moved_into_place(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    save_adapter(trained(), tmp_path, write_extra=lambda staging: (staging / "README.md").write_text("my card"))
    assert (tmp_path / "README.md").read_text() == "my card"
    assert sorted(path.name for path in tmp_path.iterdir()) == ADAPTER_FILES


def test_sealed_saves_are_byte_identical(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    # safetensors writes its metadata from a hash map, in a random order; the sealed file sorts it.
    model = trained()
    saved = {save_adapter(model, tmp_path / str(index)).joinpath(WEIGHTS).read_bytes() for index in range(4)}
    assert len(saved) == 1


KILLED_SAVE = """
import sys
import torch
sys.path.insert(0, {tests!r})
from conftest import build_model
from peft import get_peft_model
from surgical_peft import SurgicalConfig, save_adapter

directory = sys.argv[1]
save_adapter(get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage1")), directory + "/first")
save_adapter(get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage1")), directory + "/adapter")
second = get_peft_model(build_model("resnet-basic"), SurgicalConfig(block="stage2"))
with torch.no_grad():
    for parameter in second.parameters():
        if parameter.requires_grad:
            parameter.add_(0.1)
save_adapter(second, directory + "/second")
import os
os.environ["_SURGICAL_PEFT_KILL_AT"] = sys.argv[2]
save_adapter(second, directory + "/adapter")
"""


@pytest.mark.parametrize(
    ("step", "expected"),
    [("staged", "first"), (f"after {WEIGHTS}", "second"), (f"after {CONFIG}", "second")],
)
def test_a_killed_save_leaves_a_complete_adapter(
    step: str,
    expected: str,
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    tmp_path: Path,
) -> None:
    # The process SIGKILLs itself at `step` while replacing an adapter on stage1 by one on stage2 (another config).
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "train_log.txt").write_text("mine")
    script = KILLED_SAVE.format(tests=str(Path(__file__).parent))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), step], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -9, result.stderr
    adapter = tmp_path / "adapter"
    assert (adapter / "train_log.txt").read_text() == "mine"
    assert [path.name for path in adapter.iterdir() if path.name.startswith(".")]  # the killed save's staging
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = logits_of(PeftModel.from_pretrained(make_model("resnet-basic"), adapter))
    # between the two renames, the new weights sit beside the old config: the weights' own record describes them
    assert any("disagrees" in str(warning.message) for warning in caught) == (step == f"after {WEIGHTS}")
    reference = logits_of(PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / expected))
    assert torch.equal(loaded, reference)
    other = "second" if expected == "first" else "first"
    assert not torch.equal(loaded, logits_of(PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / other)))
    save_adapter(get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="head")), adapter)  # cleans up
    assert sorted(path.name for path in adapter.iterdir()) == sorted([*ADAPTER_FILES, "train_log.txt"])


# ------------------------------------------------------------------------------------------ 6: non-finite tensors
def _first_float(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    """Apply `change` to the floating tensor of an adapter file that comes first by name."""

    def change_first(tensors: dict[str, torch.Tensor]) -> None:
        key = min(key for key, tensor in tensors.items() if tensor.is_floating_point())
        tensors[key] = change(tensors[key])

    return change_first


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_adapter_file_is_refused(
    value: float,
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, _first_float(lambda tensor: torch.full_like(tensor, value)))
    first = min(key for key, tensor in load_file(tmp_path / WEIGHTS).items() if tensor.is_floating_point())
    base = make_model("resnet-basic")
    before = take_snapshot(base)
    with pytest.raises(InputError, match=rf"holds NaN or inf in 1 tensor\(s\): {first}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def test_negative_running_variance_is_refused(
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained().save_pretrained(tmp_path)
    rewrite_weights(tmp_path, lambda tensors: tensors.update({RUNNING_VAR: tensors[RUNNING_VAR] - 100.0}))
    base = make_model("resnet-basic")
    before = take_snapshot(base)
    with pytest.raises(InputError, match=f"negative running variance to {RUNNING_VAR}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def flip_byte_of(path: Path, key: str, byte: int) -> None:
    """Set byte `byte` of tensor `key`'s data in the safetensors file `path` to 0xFF."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    start, _ = json.loads(data[8 : 8 + length])[key]["data_offsets"]
    data[8 + length + start + byte] = 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_is_caught_by_the_checksum(
    trained: Callable[..., PeftModel], make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    save_adapter(trained(), tmp_path)
    assert load_file(tmp_path / WEIGHTS)[TRACKED].item() == 3
    flip_byte_of(tmp_path / WEIGHTS, TRACKED, byte=2)
    assert load_file(tmp_path / WEIGHTS)[TRACKED].item() == 3 + 0xFF0000  # a valid file, a wrong value
    with pytest.raises(InputError, match="corrupt: its tensors do not match the sha256"):
        PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)


def test_non_finite_weights_are_not_saved(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    model = trained()
    save_adapter(model, tmp_path)
    previous = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    weight = model.base_model.model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match=r"not saved: its weights holds NaN or inf .*layer\.0\.convolution\.weight"):
        save_adapter(model, tmp_path)
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == previous


def test_float16_overflow_is_refused_with_a_suggestion(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    model = trained(delta_dtype="float16")
    weight = model.base_model.model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight
    with torch.no_grad():
        weight[0, 0, 0, 0] += 1e5  # beyond float16's 65504
    with pytest.raises(InputError, match=r"overflow delta_dtype='float16' in .*convolution\.weight.*'bfloat16'"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    model.peft_config["default"].delta_dtype = "bfloat16"
    save_adapter(model, tmp_path / "adapter")
    assert (tmp_path / "adapter" / WEIGHTS).is_file()


# --------------------------------------------------------------------------- 7: a failed load changes nothing
def _no_weights(directory: Path) -> None:
    (directory / WEIGHTS).unlink()


def _only_a_pickle(directory: Path) -> None:  # not a pickle at all: safetensors bytes under PEFT's pickle name
    (directory / WEIGHTS).rename(directory / "adapter_model.bin")


def _another_base(directory: Path) -> None:
    recorded = json.loads((directory / CONFIG).read_text())["base_fingerprint"]
    edit_config(directory, base_fingerprint={**recorded, "blocks": dict.fromkeys(recorded["blocks"], "0" * 16)})


BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "another base": (_another_base, "different base weights"),
    "no weights file": (_no_weights, "holds no adapter_model.safetensors \\(nor adapter_model.bin\\)"),
    "a broken .bin": (_only_a_pickle, "adapter_model.bin is not a valid tensors-only PyTorch file"),
    "a non-finite file": (lambda d: rewrite_weights(d, _first_float(lambda t: t * float("nan"))), "NaN or inf"),
    "a wrong shape": (lambda d: rewrite_weights(d, _first_float(lambda t: t.flatten()[:3])), "has shape \\(3,\\)"),
    "every module excluded": (lambda d: edit_config(d, exclude_modules=".*"), "hold no tensors to tune"),
}


@pytest.mark.parametrize("damage", list(BROKEN))
def test_failed_load_leaves_the_base_exactly_as_before(
    damage: str,
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained().save_pretrained(tmp_path)
    spoil, message = BROKEN[damage]
    spoil(tmp_path)
    base = make_model("resnet-basic")
    base.classifier[1].bias.requires_grad_(False)
    before, names = take_snapshot(base), attributes(base)
    with pytest.raises(InputError, match=message):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)
    assert attributes(base) == names


@pytest.mark.parametrize("damage", list(BROKEN))
def test_failed_load_adapter_leaves_no_phantom_adapter(
    damage: str,
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    tmp_path: Path,
) -> None:
    save_adapter(trained(), tmp_path / "good")
    trained(block="stage2").save_pretrained(tmp_path / "bad")
    spoil, message = BROKEN[damage]
    spoil(tmp_path / "bad")
    model = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path / "good", is_trainable=True)
    expected, flags, names = logits_of(model), take_flags(model), attributes(model)
    with pytest.raises(InputError, match=message):
        model.load_adapter(tmp_path / "bad", adapter_name="x")
    assert list(model.peft_config) == ["default"] and model.active_adapters == ["default"]
    assert all("x" not in layer.adapters for layer in model.base_model.surgical_layers.values())
    assert torch.equal(logits_of(model), expected)
    assert take_flags(model) == flags and attributes(model) == names


def take_flags(model: nn.Module) -> dict[str, bool]:
    return {name: parameter.requires_grad for name, parameter in model.named_parameters()}


# ------------------------------------------------------------------------------------------ 8: regex in a file
REGEX_LOAD = """
import sys
sys.path.insert(0, {tests!r})
from conftest import build_model
from peft import PeftModel
PeftModel.from_pretrained(build_model("resnet-basic"), sys.argv[1])
print("loaded")
"""


def test_a_catastrophic_regex_in_the_config_is_never_run(trained: Callable[..., PeftModel], tmp_path: Path) -> None:
    trained().save_pretrained(tmp_path)  # unsealed: the config file is all there is
    edit_config(tmp_path, block=None, target_modules="(.+)+Z")
    script = REGEX_LOAD.format(tests=str(Path(__file__).parent))
    # Run by PEFT's re.fullmatch on each module name, this pattern would take years; a hang shows as a timeout.
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "loaded" in result.stdout


def test_an_adapter_defined_by_a_regex_loads_the_recorded_modules(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(target_modules=r"resnet\.encoder\.stages\.0"))
    train(model)
    save_adapter(model, tmp_path)
    config = SurgicalConfig.from_pretrained(tmp_path)
    assert config.target_modules == r"resnet\.encoder\.stages\.0"
    assert config.saved_modules and all(path.startswith("resnet.encoder.stages.0.") for path in config.saved_modules)
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------- 9: tampered configs
def _write(text: str) -> Callable[[Path], None]:
    return lambda directory: (directory / CONFIG).write_text(text)


TAMPERED: dict[str, tuple[Callable[[Path], None], str]] = {
    "peft_type NOPE": (lambda d: edit_config(d, peft_type="NOPE"), "peft_type .*'NOPE'"),
    "peft_type missing": (lambda d: _write(json.dumps({"target_modules": ["resnet.embedder"]}))(d), "no peft_type"),
    "target_modules 123": (lambda d: edit_config(d, target_modules=123), "target_modules must be a regex string"),
    "target_modules ([": (lambda d: edit_config(d, target_modules="(["), "target_modules is not a valid regular"),
    "base_fingerprint garbage": (lambda d: edit_config(d, base_fingerprint="garbage"), "base_fingerprint must be"),
    "invalid JSON": (_write('{"peft_type": "SURGICAL",'), "is not a readable JSON file"),
    "a JSON list": (_write("[1, 2]"), "must hold a JSON object .*, not a list"),
    "nested too deep": (_write("[" * 100_000 + "]" * 100_000), "is not a readable JSON file"),
    "task_type NOPE": (lambda d: edit_config(d, task_type="NOPE"), "Unknown task_type 'NOPE'. Valid: None, SEQ_CLS"),
}


@pytest.mark.parametrize("reader", [SurgicalConfig, PeftConfig])  # PEFT's generic reader too
@pytest.mark.parametrize("tamper", list(TAMPERED))
def test_tampered_config_names_the_file_and_the_field(
    tamper: str, reader: type[PeftConfig], trained: Callable[..., PeftModel], tmp_path: Path
) -> None:
    trained().save_pretrained(tmp_path)
    spoil, message = TAMPERED[tamper]
    spoil(tmp_path)
    with pytest.raises(InputError, match=message) as error:
        reader.from_pretrained(tmp_path)
    assert str(error.value).startswith(str(tmp_path / CONFIG))


@pytest.mark.parametrize("tamper", list(TAMPERED))
def test_tampered_config_refused_by_peft_model_before_any_change(
    tamper: str,
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained().save_pretrained(tmp_path)
    spoil, message = TAMPERED[tamper]
    spoil(tmp_path)
    base = make_model("resnet-basic")
    before = take_snapshot(base)
    with pytest.raises(InputError, match=message) as error:
        PeftModel.from_pretrained(base, tmp_path)  # PEFT reads the file before any tuner code runs
    assert str(error.value).startswith(str(tmp_path / CONFIG))
    assert_untouched(base, before)


def test_a_config_that_excludes_its_own_block_names_the_adapter(
    trained: Callable[..., PeftModel], make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    trained().save_pretrained(tmp_path)
    edit_config(tmp_path, exclude_modules=["resnet.encoder.stages.0"])
    with pytest.raises(NoMatchingPeftModuleError, match=f"No modules were targeted.*the config of {tmp_path}"):
        PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)


def test_other_methods_adapters_load_as_before(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    lora = get_peft_model(base, LoraConfig(target_modules=["0"], init_lora_weights=False))
    lora.save_pretrained(tmp_path)
    assert type(PeftConfig.from_pretrained(tmp_path)) is LoraConfig
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), tmp_path)
    inputs = torch.randn(3, 4)
    torch.testing.assert_close(loaded(inputs), lora(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("tamper", ["target_modules 123", "target_modules ([", "base_fingerprint garbage"])
def test_tampered_field_refused_by_peft_model(
    tamper: str,
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    save_adapter(trained(), tmp_path)  # sealed: the file's checks come before the record is consulted
    spoil, message = TAMPERED[tamper]
    spoil(tmp_path)
    base = make_model("resnet-basic")
    before = take_snapshot(base)
    with pytest.raises(InputError, match=f"{CONFIG}: {message}"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


# ------------------------------------------------------------------------------ 10: the fingerprint check holds
@pytest.mark.parametrize("edit", [{"base_fingerprint": None}, {"verify_base": False}])
def test_an_edited_config_cannot_skip_the_base_check(
    edit: dict[str, Any],
    trained: Callable[..., PeftModel],
    make_model: Callable[..., nn.Module],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    trained().save_pretrained(tmp_path)  # unsealed: the config file is all there is
    edit_config(tmp_path, **edit)
    other = make_model("resnet-basic", seed=1)
    before = take_snapshot(other)
    message = "records no base_fingerprint" if "base_fingerprint" in edit else r"block\(s\) .* differ"
    with warnings.catch_warnings(record=True) as caught, pytest.raises(InputError, match=message):
        warnings.simplefilter("always")
        PeftModel.from_pretrained(other, tmp_path)
    assert_untouched(other, before)
    ignored = {str(warning.message) for warning in caught if "verify_base" in str(warning.message)}
    warned = f"{tmp_path / CONFIG} holds verify_base, which is never saved: ignored."
    assert ignored == ({warned} if "verify_base" in edit else set())
    for reader in (SurgicalConfig, PeftConfig):  # PEFT's generic reader too
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert reader.from_pretrained(tmp_path).verify_base is True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PeftModel.from_pretrained(make_model("resnet-basic", seed=1), tmp_path, verify_base=False)  # the caller may


def test_a_sealed_adapter_keeps_its_recorded_fingerprint(
    trained: Callable[..., PeftModel], make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    save_adapter(trained(), tmp_path)
    edit_config(tmp_path, base_fingerprint=None)
    with (
        pytest.warns(UserWarning, match="disagrees with .* on base_fingerprint"),
        pytest.raises(InputError, match=r"block\(s\) .* differ"),
    ):
        PeftModel.from_pretrained(make_model("resnet-basic", seed=1), tmp_path)


def test_a_pickled_adapter_loads_through_the_tensors_only_unpickler(
    trained: Callable[..., PeftModel], make_model: Callable[..., nn.Module], tmp_path: Path
) -> None:
    # PEFT's save_pretrained(safe_serialization=False) writes adapter_model.bin; PEFT loads it with
    # torch.load(weights_only=True), and so do the checks before it: no arbitrary object is ever unpickled.
    model = trained()
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.bin",
    ]
    loaded = PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
    for name, tensor in model.base_model.model.state_dict().items():  # base + (tuned - base): rounding only
        torch.testing.assert_close(loaded.base_model.model.state_dict()[name], tensor, rtol=0, atol=1e-6, msg=name)
    torch.save({"base_model.model.x": object()}, tmp_path / "adapter_model.bin")
    with pytest.raises(InputError, match="not a valid tensors-only PyTorch file"):
        PeftModel.from_pretrained(make_model("resnet-basic"), tmp_path)
