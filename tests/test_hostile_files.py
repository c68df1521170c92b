"""Hostile adapter files and configs (issue 26): a header announcing 8 GB is refused before a byte of it is read,
millions of module names are refused (or matched) at once with a one-line message, and a head trained for other
labels is refused before the model is touched."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

from surgical_peft import SurgicalConfig, save_adapter
from surgical_peft.errors import InputError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
PREFIX = "base_model.model."
CONV = f"{PREFIX}resnet.encoder.stages.0.layers.0.layer.0.convolution.weight"
BOMB_SHAPE = [8, 8, 3, 11_184_811]  # float32: 8.6 GB, where the model's tensor is (8, 8, 3, 3)
ANNOUNCED_BYTES = 4 * 8 * 8 * 3 * 11_184_811
SHORT = 400  # characters: a message names a few values and the count, never a million of them


def header_of(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def write_header(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Rewrite `path` as a safetensors file with `header`, its data region `data_bytes` of zeros, left sparse (a
    hole: `truncate`, as an attacker makes it, takes no disk space)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
    os.truncate(path, 8 + len(text) + data_bytes)
    if path.stat().st_blocks * 512 > 2**20:
        pytest.skip("this file system does not keep sparse files (the test would write 8 GB)")


def announce(path: Path, key: str, shape: list[int]) -> None:
    """Rewrite the weights file so that its header announces `key` with `shape` (float32), offsets recomputed."""
    header = header_of(path)
    metadata = header.pop("__metadata__", None)
    header[key] = {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}
    end = 0
    for entry in sorted(header.values(), key=lambda entry: entry["data_offsets"][0]):
        count = 4 if entry["dtype"] == "F32" else 8  # the tiny ResNet's adapter: float32 and int64 tensors
        for size in entry["shape"]:
            count *= size
        entry["data_offsets"] = [end, end + count]
        end += count
    write_header(path, {**header, **({"__metadata__": metadata} if metadata else {})}, end)


def saved_adapter(
    directory: Path, make_model: Callable[..., nn.Module], train: Callable[..., None], **config: Any
) -> Path:
    model = get_peft_model(make_model("resnet-basic", **config.pop("base", {})), SurgicalConfig(**config))
    train(model)
    model.save_pretrained(directory)  # PEFT's own writer: no seal, the header is all there is to check
    return directory


# ------------------------------------------------------------------------- 7: a header that announces 8 GB
LOAD_UNDER_A_MEMORY_LIMIT = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))  # address space: the process cannot take 8 GB
sys.path.insert(0, {tests!r})
from conftest import build_model
from peft import PeftModel
from surgical_peft import SurgicalConfig

def attempt(entry):
    try:
        if entry == "SurgicalConfig.from_pretrained":
            SurgicalConfig.from_pretrained(sys.argv[1])
        elif entry == "PeftModel.from_pretrained":
            PeftModel.from_pretrained(build_model("resnet-basic"), sys.argv[1])
        else:
            PeftModel.from_pretrained(build_model("resnet-basic"), sys.argv[2]).load_adapter(sys.argv[1], "x")
    except BaseException as error:
        return [type(error).__name__, str(error)]
    return ["returned", ""]

outcomes = {{entry: attempt(entry) for entry in sys.argv[3:]}}
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"outcomes": outcomes, "peak_rss": peak}}))
"""
ENTRIES = ["SurgicalConfig.from_pretrained", "PeftModel.from_pretrained", "load_adapter"]


def load_in_a_child(adapter: Path, good: Path) -> dict[str, Any]:
    script = LOAD_UNDER_A_MEMORY_LIMIT.format(tests=str(Path(__file__).parent))
    result = subprocess.run(
        [sys.executable, "-c", script, str(adapter), str(good), *ENTRIES], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("key", [CONV, f"{PREFIX}resnet.nothing.weight"], ids=["a tuned weight", "no module's"])
def test_a_header_announcing_8_gb_is_refused_before_reading(
    key: str, make_model: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    adapter = saved_adapter(tmp_path / "adapter", make_model, train, block="stage1")
    good = saved_adapter(tmp_path / "good", make_model, train, block="stage2")
    announce(adapter / WEIGHTS, key, BOMB_SHAPE)
    assert (adapter / WEIGHTS).stat().st_size > ANNOUNCED_BYTES
    result = load_in_a_child(adapter, good)
    assert result["peak_rss"] < 2**30, f"the loading process took {result['peak_rss'] / 2**30:.1f} GiB"
    outcomes = result["outcomes"]
    assert outcomes.pop("SurgicalConfig.from_pretrained") == ["returned", ""]  # a config read reads the header only
    for entry, (kind, message) in outcomes.items():
        assert kind == "InputError", (entry, kind, message)
        assert message.startswith(f"{adapter / WEIGHTS} does not fit this model (refused before reading it)")
        if key == CONV:
            assert f"{CONV} has shape (8, 8, 3, 11184811), the model's is (8, 8, 3, 3)" in message
        else:
            assert f"1 tensor(s) this model does not have: '{key}'" in message


def test_header_offsets_are_checked_against_the_file_size(
    make_model: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    adapter = saved_adapter(tmp_path / "adapter", make_model, train, block="stage1")
    header = header_of(adapter / WEIGHTS)
    end = max(entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__")
    write_header(adapter / WEIGHTS, header, end - 4)  # the last tensor's bytes cut short
    with pytest.raises(InputError, match=f"announces {end:,} bytes of tensors, and {end - 4:,} follow it"):
        SurgicalConfig.from_pretrained(adapter)


def test_a_header_naming_a_tensor_twice_is_refused(
    make_model: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    # Python's json keeps the last of two equal names; another parser (safetensors' own) may read the first.
    adapter = saved_adapter(tmp_path / "adapter", make_model, train, block="stage1")
    data = (adapter / WEIGHTS).read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + length].rstrip()
    entry = json.dumps({"dtype": "F32", "shape": BOMB_SHAPE, "data_offsets": [0, ANNOUNCED_BYTES]})
    text = text[:-1] + f', "{CONV}": {entry}}}'.encode()
    text += b" " * (-len(text) % 8)
    (adapter / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(InputError, match=f"a name given twice in one object: .{CONV}."):
        SurgicalConfig.from_pretrained(adapter)


# --------------------------------------------------------------------------------- 8: millions of names
@pytest.mark.parametrize(
    ("damage", "kind"),
    [
        (lambda weights: weights.mkdir(), "a directory"),
        (lambda weights: weights.symlink_to("/dev/zero"), "a symlink to /dev/zero"),
        (lambda weights: weights.symlink_to(weights.with_name("gone")), "which does not exist"),
    ],
    ids=["a directory", "/dev/zero", "a dangling symlink"],
)
def test_a_weights_file_that_is_no_file_is_refused_when_the_config_is_read(
    damage: Callable[[Path], Any],
    kind: str,
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    tmp_path: Path,
) -> None:
    """Only a directory without anything at the weights file's name holds a config alone (PEFT's
    `config.save_pretrained`): something else there was read as that, and the damaged adapter as a valid config."""
    adapter = saved_adapter(tmp_path / "adapter", make_model, train, block="stage1")
    (adapter / WEIGHTS).unlink()
    assert SurgicalConfig.from_pretrained(adapter).block == "stage1"  # the config alone
    damage(adapter / WEIGHTS)
    with pytest.raises(InputError, match=f"{adapter / WEIGHTS} is not a regular file \\(.*{kind}"):
        SurgicalConfig.from_pretrained(adapter)


def test_a_config_with_a_million_names_is_refused_at_once() -> None:
    names = [f"m{index}" for index in range(1_000_000)]
    cases = {
        "target_modules lists 1,000,000 names": {"target_modules": names},
        "target_modules lists 1,000,000": {"block": "stage1", "target_modules": names},
        "block lists 1,000,000 names": {"block": names},
        "block holds a name of 10,000,000 characters": {"block": "x" * 10_000_000},
        "exclude_modules lists 1,000,000 names": {"target_modules": ["a"], "exclude_modules": names},
        "modules_to_save lists 1,000 names": {"block": "stage1", "modules_to_save": names[:1000]},
    }
    for message, fields in cases.items():
        with pytest.raises(InputError, match=message) as error:
            SurgicalConfig(**fields)
        assert len(str(error.value)) < SHORT, str(error.value)[:SHORT]
        assert "at most" in str(error.value)


def test_a_tampered_config_with_a_million_names_leaves_the_model_untouched(
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    adapter = saved_adapter(tmp_path, make_model, train, block="stage1")
    config = json.loads((adapter / CONFIG).read_text())
    (adapter / CONFIG).write_text(json.dumps({**config, "target_modules": [f"m{i}" for i in range(1_000_000)]}))
    base = make_model("resnet-basic")
    before = take_snapshot(base)
    with pytest.raises(InputError, match="target_modules lists 1,000,000 names") as error:
        PeftModel.from_pretrained(base, adapter)
    assert str(error.value).startswith(str(adapter / CONFIG)) and len(str(error.value)) < SHORT
    assert_untouched(base, before)


MANY_NAMES = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import build_model
from peft import PeftModel, get_peft_model
from surgical_peft import SurgicalConfig, save_adapter

names = [f"m{{index}}" for index in range(99_999)]
outcomes = {{}}
for case, fields in {{
    "beside the real module": {{"target_modules": [*names, "resnet.encoder.stages.0"]}},
    "only names of no module": {{"target_modules": names}},
    "beside block": {{"block": "stage1", "target_modules": names}},
    "excluding nothing": {{"target_modules": ["resnet.encoder.stages.0"], "exclude_modules": names}},
}}.items():
    try:
        model = get_peft_model(build_model("resnet-basic"), SurgicalConfig(**fields))
        tuned = sorted({{name.split(".layers.")[0] for name, p in model.base_model.model.named_parameters()
                        if p.requires_grad}})
        outcomes[case] = ["tuned", tuned, len(model.peft_config["default"].target_modules)]
        if case == "beside the real module":
            save_adapter(model, sys.argv[1])
            loaded = PeftModel.from_pretrained(build_model("resnet-basic"), sys.argv[1])
            outcomes["loaded from a file"] = ["loaded", len(loaded.peft_config["default"].target_modules)]
    except Exception as error:
        outcomes[case] = [type(error).__name__, str(error).split("\\n")[0]]
print(json.dumps(outcomes))
"""


def test_a_hundred_thousand_names_are_matched_at_once(tmp_path: Path) -> None:
    # PEFT tries every name against every module and condenses long lists by a search quadratic in their length
    # (10,000 names took 8.6 s; 99,999 would take about 100 times as long); only the names that can match a module
    # are matched. A hang shows as a timeout.
    script = MANY_NAMES.format(tests=str(Path(__file__).parent))
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "adapter")], capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stderr[-2000:]
    outcomes = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcomes["beside the real module"] == ["tuned", ["resnet.encoder.stages.0"], 100_000]  # the user's list
    assert outcomes["excluding nothing"] == ["tuned", ["resnet.encoder.stages.0"], 1]
    assert outcomes["loaded from a file"] == ["loaded", 100_000]
    kind, message = outcomes["only names of no module"]
    assert kind == NoMatchingPeftModuleError.__name__
    assert (
        message == "Target modules 'm0', 'm1', 'm2', ... (99,999 in all) not found in the base model. Please "
        "check the target modules and try again."
    )
    kind, message = outcomes["beside block"]
    assert kind == "InputError" and len(message) < SHORT
    assert "records target_modules 'm0', 'm1', 'm2', ... (99,999 in all); pass only one of them" in message


# ----------------------------------------------------------------------- 9: a head trained for other labels
def head_adapter(directory: Path, make_model: Callable[..., nn.Module], train: Callable[..., None]) -> Path:
    """A stage1 adapter with a 3-label classifier in modules_to_save, saved by save_adapter (which records the
    labels)."""
    base = make_model("resnet-basic")
    base.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    model = get_peft_model(base, SurgicalConfig(block="stage1", modules_to_save=["classifier"]))
    train(model)
    return save_adapter(model, directory)


def five_labels(make_model: Callable[..., nn.Module]) -> nn.Module:
    base = make_model("resnet-basic", num_labels=5)
    base.config.id2label = dict(enumerate(["ant", "bee", "cow", "eel", "fox"]))
    return base


HEAD_MESSAGE = (
    r"does not fit this model \(refused before reading it\): base_model\.model\.classifier\.1\.bias has shape "
    r"\(3,\), the model's is \(5,\); base_model\.model\.classifier\.1\.weight has shape \(3, 16\), the model's is "
    r"\(5, 16\)\. The adapter's head \(modules_to_save\) was trained for 3 labels \('cat', 'dog', 'bird'\); this "
    r"model's config has 5 \('ant', 'bee', 'cow', \.\.\. \(5 in all\)\)"
)


def test_a_head_for_other_labels_is_refused_before_touching_the_base(
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    take_snapshot: Callable[[nn.Module], Any],
    assert_untouched: Callable[[nn.Module, Any], None],
    tmp_path: Path,
) -> None:
    adapter = head_adapter(tmp_path, make_model, train)
    base = five_labels(make_model)
    base.classifier[1].bias.requires_grad_(False)
    before, names = take_snapshot(base), {name: set(vars(m)) for name, m in base.named_modules()}
    with pytest.raises(InputError, match=HEAD_MESSAGE):
        PeftModel.from_pretrained(base, adapter)
    assert_untouched(base, before)
    assert {name: set(vars(m)) for name, m in base.named_modules()} == names


def test_load_adapter_of_a_head_for_other_labels_leaves_the_model_untouched(
    make_model: Callable[..., nn.Module],
    train: Callable[..., None],
    take_snapshot: Callable[[nn.Module], Any],
    tmp_path: Path,
) -> None:
    adapter = head_adapter(tmp_path / "head", make_model, train)
    model = get_peft_model(five_labels(make_model), SurgicalConfig(block="stage2", modules_to_save=["classifier"]))
    before = take_snapshot(model)
    names = {name: set(vars(m)) for name, m in model.named_modules()}
    configs = {name: config.to_dict() for name, config in model.peft_config.items()}
    with pytest.raises(InputError, match=HEAD_MESSAGE):
        model.load_adapter(adapter, adapter_name="x")
    after = take_snapshot(model)
    assert list(after.tensors) == list(before.tensors)
    assert all(torch.equal(after.tensors[name], tensor) for name, tensor in before.tensors.items())
    assert after.requires_grad == before.requires_grad and after.hooks == before.hooks
    assert {name: set(vars(m)) for name, m in model.named_modules()} == names
    assert {name: config.to_dict() for name, config in model.peft_config.items()} == configs
    assert model.active_adapters == ["default"]
