"""`import surgical_peft` registers the SURGICAL type with PEFT in whichever order the two are imported, without
importing PEFT itself (`surgical_peft.registration`). Each case runs in a fresh interpreter, as a user's script does:
in this one, both are imported already."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig

HEAVY = ("torch", "peft", "transformers", "accelerate", "datasets")

# Loads the adapter in `sys.argv[1]` (its base in `sys.argv[2]`) every way PEFT offers, after only `import
# surgical_peft`, and checks the outputs against `sys.argv[3]`.
SURGICAL_FIRST = """
import sys
import surgical_peft
from surgical_peft.registration import _AfterPeft

assert not [name for name in {heavy!r} if name in sys.modules], "import surgical_peft loaded a heavy module"
assert sum(isinstance(finder, _AfterPeft) for finder in sys.meta_path) == 1

from peft import AutoPeftModel, PeftConfig, PeftModel

assert not any(isinstance(finder, _AfterPeft) for finder in sys.meta_path), "the hook stays after PEFT is imported"
import torch
from transformers import AutoModelForImageClassification

adapter, base, expected = sys.argv[1:]
pixel_values, logits = torch.load(expected)

def check(model):
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=pixel_values).logits, logits, rtol=0, atol=1e-5)

check(PeftModel.from_pretrained(AutoModelForImageClassification.from_pretrained(base), adapter))
check(AutoPeftModel.from_pretrained(adapter))
print(type(PeftConfig.from_pretrained(adapter)).__name__)
"""

PEFT_FIRST = """
import sys
import peft.utils

calls = []
register = peft.utils.register_peft_method
peft.utils.register_peft_method = lambda **kwargs: calls.append(kwargs["name"]) or register(**kwargs)

import surgical_peft
import torch
from peft import PeftModel, get_peft_model
from surgical_peft.registration import _AfterPeft, register_with_peft
from transformers import ResNetConfig, ResNetForImageClassification

register_with_peft()  # again: nothing more happens

def base():
    torch.manual_seed(0)
    return ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))

get_peft_model(base(), surgical_peft.SurgicalConfig(block="stage1")).save_pretrained(sys.argv[1])
fresh = base()
print(type(PeftModel.from_pretrained(fresh, sys.argv[1]).peft_config["default"]).__name__)
print("registered", calls, "hooks", sum(isinstance(finder, _AfterPeft) for finder in sys.meta_path))
"""

# `importlib.util.find_spec("peft")` (transformers' check that PEFT is installed) finds PEFT without running it: the
# hook must wait for the real import, which here starts with a submodule, after a second `register_with_peft()`.
PROBE_FIRST = """
import importlib.util
import sys
import surgical_peft
from surgical_peft.registration import _AfterPeft, register_with_peft

assert importlib.util.find_spec("peft") is not None
register_with_peft()
assert "peft" not in sys.modules
assert sum(isinstance(finder, _AfterPeft) for finder in sys.meta_path) == 1, sys.meta_path

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType

print(PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SURGICAL].__name__)
print("hooks", sum(isinstance(finder, _AfterPeft) for finder in sys.meta_path))
loader = sys.modules["peft"].__spec__.loader
print("loader", type(loader).__name__, "exec_module" in vars(loader))  # PEFT's own, its own method again
"""

# A public name used before PEFT is imported: its import imports PEFT, whose hook then finds the tuner half imported.
NAME_FIRST = """
import sys
import surgical_peft

config = surgical_peft.SurgicalConfig(block="stage1")
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

print(config.peft_type.value, PEFT_TYPE_TO_CONFIG_MAPPING[config.peft_type] is type(config))
"""


def _run(script: str, *args: object, cwd: Path) -> str:
    command = [sys.executable, "-c", textwrap.dedent(script), *map(str, args)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_surgical_peft_first_then_every_peft_loader(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    pixel_values: torch.Tensor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = make_model("resnet-basic")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, SurgicalConfig(block="stage1", init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")  # for AutoPeftModel
    model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    torch.save((pixel_values, logits_of(model)), tmp_path / "expected.pt")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    output = _run(
        SURGICAL_FIRST.format(heavy=HEAVY), tmp_path / "adapter", tmp_path / "base", "expected.pt", cwd=tmp_path
    )
    assert output.split() == ["SurgicalConfig"]


def test_peft_first_registers_at_once_and_once(tmp_path: Path) -> None:
    output = _run(PEFT_FIRST, tmp_path / "adapter", cwd=tmp_path)
    assert output.splitlines() == ["SurgicalConfig", "registered ['surgical'] hooks 0"]


def test_a_probe_of_peft_leaves_the_hook_waiting_for_the_import(tmp_path: Path) -> None:
    output = _run(PROBE_FIRST, cwd=tmp_path)
    assert output.splitlines() == ["SurgicalConfig", "hooks 0", "loader SourceFileLoader False"]


def test_a_public_name_before_peft(tmp_path: Path) -> None:
    assert _run(NAME_FIRST, cwd=tmp_path).split() == ["SURGICAL", "True"]
