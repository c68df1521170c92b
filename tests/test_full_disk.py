"""A disk that fills up while a run writes (issue 26): the command line exits 2 with one line that says "No space
left on device", names the path, what the write needed and what was free; the incomplete checkpoint is removed, the
rerun after freeing space is bit-identical to an uninterrupted run, and `save_adapter` leaves the old adapter as it
was.

A full disk is simulated at the write layer (the writer leaves half a file and raises what it raises on a full disk,
and the file system then reports little free space); where the tests may mount a file system (root), a real small
tmpfs is filled too."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import accelerate.checkpointing
import peft.peft_model
import pytest
import safetensors
from peft import get_peft_model
from test_resume import assert_identical, train_argv

from surgical_peft import SurgicalConfig, save_adapter
from surgical_peft.cli import main

FREE = 40_000  # bytes the full file system reports free: room for one of the tiny model's checkpoints, not two
ADAPTER_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors"]
CHECKPOINT_FAILURES = {
    "Python's ENOSPC": lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    "torch's zip writer": lambda: RuntimeError(
        "[enforce fail at inline_container.cc:672] . unexpected pos 2112 vs 2004"
    ),
}


@pytest.fixture(scope="module")
def reference(tiny_model: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted two-epoch run."""
    output = tmp_path_factory.mktemp("reference") / "run"
    assert main(train_argv(tiny_model, output)) == 0
    return output


def fill_the_disk(monkeypatch: pytest.MonkeyPatch, failing_call: int, error: BaseException) -> None:
    """From Accelerate's second file write on, the file system reports `FREE` bytes free; its `failing_call`-th write
    leaves half a file and raises `error`, as a writer does on a full disk."""
    calls = 0
    original_save, real_disk_usage = accelerate.checkpointing.save, shutil.disk_usage

    def save(obj: object, path: str, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        original_save(obj, path, **kwargs)
        if calls == failing_call:
            os.truncate(path, os.path.getsize(path) // 2)
            raise error

    def disk_usage(path: str | os.PathLike[str]) -> shutil._ntuple_diskusage:
        usage = real_disk_usage(path)
        return usage._replace(free=min(usage.free, FREE)) if calls >= 2 else usage

    monkeypatch.setattr(accelerate.checkpointing, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", disk_usage)


def assert_refused_for_space(code: int, stderr: str, output: Path) -> None:
    """Exit 2, one line naming the disk, the incomplete checkpoint and the space, and only the complete checkpoint
    left (no adapter)."""
    assert code == 2
    assert "Traceback" not in stderr
    [line] = [line for line in stderr.splitlines() if "error:" in line]
    checkpoint = output / "checkpoints" / "checkpoint_1"
    assert line.startswith(
        f"surgical-peft train: error: [Errno 28] No space left on device: writing the checkpoint into {checkpoint} "
        "needs about "
    )
    assert "kB were free on its file system. The incomplete checkpoint was removed; free some space and rerun" in line
    assert sorted(path.name for path in (output / "checkpoints").iterdir()) == ["checkpoint_0"]
    assert (output / "checkpoints" / "checkpoint_0" / "progress.json").is_file()
    assert not (output / "adapter").exists()


@pytest.mark.parametrize("failure", list(CHECKPOINT_FAILURES))
def test_a_disk_full_while_checkpointing_exits_2_and_the_rerun_is_bit_identical(
    failure: str,
    tiny_model: str,
    reference: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    output = tmp_path / "run"
    argv = train_argv(tiny_model, output)
    fill_the_disk(monkeypatch, failing_call=4, error=CHECKPOINT_FAILURES[failure]())  # the 2nd checkpoint's optimizer
    code = main(argv)
    assert_refused_for_space(code, capsys.readouterr().err, output)
    monkeypatch.undo()  # space freed
    assert main(argv) == 0
    assert_identical(output, reference)


class SafetensorsFull:
    """PEFT's safetensors writer on a full disk: half the weights file written, then safetensors' own error."""

    def __init__(self) -> None:
        self.original = peft.peft_model.safe_save_file

    def __call__(self, tensors: dict[str, object], filename: str, metadata: dict[str, str] | None = None) -> None:
        self.original(tensors, filename, metadata=metadata)
        os.truncate(filename, os.path.getsize(filename) // 2)
        raise safetensors.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _card_on_a_full_disk(staging: Path) -> None:
    with (staging / "README.md").open("w") as card:
        card.write("# half a card")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("where", ["the weights", "the model card"])
def test_save_adapter_on_a_full_disk_keeps_the_old_adapter(
    where: str, make_model: Callable[..., object], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    directory = tmp_path / "adapter"
    save_adapter(get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1")), directory)
    (directory / "notes.txt").write_text("mine")
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    model = get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage2"))
    extra = None
    if where == "the weights":
        monkeypatch.setattr(peft.peft_model, "safe_save_file", SafetensorsFull())
    else:
        extra = _card_on_a_full_disk
    with pytest.raises(OSError, match="No space left on device: writing the adapter into ") as error:
        save_adapter(model, directory, write_extra=extra)
    assert error.value.errno == errno.ENOSPC
    assert f"into {directory} needs more than the " in str(error.value)
    assert str(error.value).endswith("Nothing was written: the directory is as it was (an adapter there unchanged).")
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before  # no staging left either


# ------------------------------------------------------------------------------- a real, small file system
@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`mount(size)`: a tmpfs of `size` bytes (remounted if called again: space freed); needs root."""
    point = tmp_path / "disk"
    point.mkdir()
    mounted = False

    def mount(size: int) -> Path:
        nonlocal mounted
        options = f"remount,size={size}" if mounted else f"size={size}"
        command = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)]
        if os.geteuid() != 0 or subprocess.run(command, capture_output=True).returncode != 0:
            pytest.skip("mounting a small tmpfs needs root (the simulated full disk above runs everywhere)")
        mounted = True
        return point

    yield mount
    if mounted:
        subprocess.run(["umount", "-l", str(point)], check=True)


def test_a_real_full_tmpfs_while_checkpointing(
    tiny_model: str,
    reference: Path,
    small_tmpfs: Callable[[int], Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    checkpoint = next((reference / "checkpoints").iterdir())
    size = sum(path.stat().st_size for path in checkpoint.iterdir())
    output = small_tmpfs(size * 3 // 2) / "run"  # one checkpoint fits, the next beside it does not
    argv = train_argv(tiny_model, output)
    assert_refused_for_space(main(argv), capsys.readouterr().err, output)
    small_tmpfs(size * 10)
    assert main(argv) == 0
    assert_identical(output, reference)


def test_save_adapter_on_a_real_full_tmpfs(
    make_model: Callable[..., object], small_tmpfs: Callable[[int], Path]
) -> None:
    disk = small_tmpfs(256 * 1024)
    directory = disk / "adapter"
    save_adapter(get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage1")), directory)
    before = {path.name: path.read_bytes() for path in directory.iterdir()}
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"x" * (free - 12_000))  # the stage2 adapter (18 kB) no longer fits
    with pytest.raises(OSError, match=f"No space left on device: writing the adapter into {directory} needs more"):
        save_adapter(get_peft_model(make_model("resnet-basic"), SurgicalConfig(block="stage2")), directory)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    assert sorted(before) == ADAPTER_FILES
