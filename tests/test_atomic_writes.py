"""Every file the library writes goes to a temporary file in its directory, then a rename (issue 26, finding 10): a
symlink at a name it writes is replaced by the file, and the user's file the link pointed to is left as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_model
from peft import get_peft_model
from PIL import Image

from surgical_peft import SurgicalConfig
from surgical_peft.cli import main
from surgical_peft.errors import InputError
from surgical_peft.files import write_file

WRITTEN = ("metrics.json", "run_args.json", "adapter/README.md", "adapter/adapter_config.json")


def users_files(root: Path, names: tuple[str, ...]) -> dict[str, Path]:
    """A user's file per name, outside the output directory, each with its own text."""
    (root / "mine").mkdir()
    return {name: (root / "mine" / name.replace("/", "-")) for name in names}


def test_train_replaces_symlinks_and_leaves_what_they_point_to(tiny_model: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    mine = users_files(tmp_path, WRITTEN)
    for name, target in mine.items():
        target.write_text(f"the user's {name}")
        (output / name).parent.mkdir(parents=True, exist_ok=True)
        (output / name).symlink_to(target)
    argv = ["train", "--model", tiny_model, "--block", "stage2", "--train-n", "30", "--eval-n", "20", "--epochs", "1"]
    assert main([*argv, "--batch-size", "10", "--no-progress", "--output-dir", str(output)]) == 0
    for name, target in mine.items():
        assert target.read_text() == f"the user's {name}"
        assert not (output / name).is_symlink()
    assert json.loads((output / "metrics.json").read_text())["history"]
    assert (output / "adapter" / "README.md").read_text().startswith("---")


def test_rank_json_and_plot_replace_symlinks(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    model = save_tiny_model(tmp_path / "model", num_labels=2)
    for index, label in enumerate(("a", "b")):
        (tmp_path / "images" / label).mkdir(parents=True)
        for row in range(6):
            Image.new("RGB", (16, 16), (100 * index, 20 * row, 0)).save(tmp_path / "images" / label / f"{row}.png")
    mine = users_files(tmp_path, ("scores.json", "plot.png"))
    for name, target in mine.items():
        target.write_text(f"the user's {name}")
        (tmp_path / name).symlink_to(target)
    argv = ["rank", model, str(tmp_path / "images"), "--shift", "none", "--train-n", "8", "--batch-size", "4"]
    assert main([*argv, "--json", str(tmp_path / "scores.json"), "--plot", str(tmp_path / "plot.png")]) == 0
    for name, target in mine.items():
        assert target.read_text() == f"the user's {name}" and not (tmp_path / name).is_symlink()
    assert json.loads((tmp_path / "scores.json").read_text())["blocks"]


def test_write_file_is_atomic_and_refuses_a_directory(tmp_path: Path) -> None:
    write_file(tmp_path / "new" / "a.txt", "one")
    write_file(tmp_path / "new" / "a.txt", b"two")
    assert [p.name for p in (tmp_path / "new").iterdir()] == ["a.txt"]  # no temporary file left
    assert (tmp_path / "new" / "a.txt").read_text() == "two"
    (tmp_path / "dir").mkdir()
    with pytest.raises(InputError, match="is a directory of yours in the way"):
        write_file(tmp_path / "dir", "x")
    assert list(tmp_path.glob(".dir.*")) == []


def test_save_pretrained_replaces_a_symlinked_model_card(tmp_path: Path) -> None:
    """PEFT's save_pretrained writes the card through the route to this library's card, which replaces the link."""
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
    mine = users_files(tmp_path, ("README.md",))["README.md"]
    mine.write_text("the user's README")
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "README.md").symlink_to(mine)
    model.save_pretrained(tmp_path / "adapter")
    assert mine.read_text() == "the user's README"
    assert "import surgical_peft" in (tmp_path / "adapter" / "README.md").read_text()
