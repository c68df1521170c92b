"""Loading a base model and a surgical adapter by Hub id from a local Hugging Face cache, with no network."""

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

REVISION = "0123456789abcdef0123456789abcdef01234567"

# Run in a fresh process: huggingface_hub reads HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported. Any attempt to
# open a socket fails, so a hidden network access cannot pass unnoticed.
LOADER = """
import socket
import sys

def no_network(*args, **kwargs):
    raise RuntimeError("network access attempted")

socket.socket.connect = no_network
socket.create_connection = no_network

import torch
import surgical_peft
from peft import AutoPeftModel, PeftModel
from transformers import AutoModelForImageClassification

expected = torch.load(sys.argv[1])
pixel_values = torch.load(sys.argv[2])

def logits(model):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits

base = AutoModelForImageClassification.from_pretrained("org/base")
model = PeftModel.from_pretrained(base, "org/adapter")
torch.testing.assert_close(logits(model), expected, rtol=0, atol=1e-5)
auto = AutoPeftModel.from_pretrained("org/adapter")
torch.testing.assert_close(logits(auto), expected, rtol=0, atol=1e-5)
print("loaded offline:", type(model.peft_config["default"]).__name__)
"""


def put_in_cache(cache: Path, repo_id: str, files: Path) -> None:
    """Lay out `files` as huggingface_hub caches a snapshot of `repo_id` (regular files, no blobs or symlinks)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for path in files.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)


def test_base_and_adapter_by_hub_id_offline(
    make_model: Callable[..., nn.Module],
    logits_of: Callable[[nn.Module], torch.Tensor],
    pixel_values: torch.Tensor,
    train: Callable[..., None],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    base = make_model("resnet-basic")
    base.save_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, SurgicalConfig(block="stage1"))
    train(peft_model)
    peft_model.peft_config["default"].base_model_name_or_path = "org/base"  # as if the base came from the Hub
    # PEFT looks the base's config.json up on the Hub when saving (a vocabulary-resize check); not here.
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    cache = tmp_path / "home" / "hub"
    put_in_cache(cache, "org/base", tmp_path / "base")
    put_in_cache(cache, "org/adapter", tmp_path / "adapter")
    torch.save(logits_of(peft_model), tmp_path / "expected.pt")
    torch.save(pixel_values, tmp_path / "pixel_values.pt")
    (tmp_path / "load.py").write_text(textwrap.dedent(LOADER))

    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = subprocess.run(
        [sys.executable, "load.py", "expected.pt", "pixel_values.pt"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded offline: SurgicalConfig" in result.stdout
