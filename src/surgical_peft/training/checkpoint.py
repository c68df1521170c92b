"""Checkpoints of a run, one per epoch under `<output_dir>/checkpoints/checkpoint_<n>` (`n` counts the epochs done,
from 0): model, optimizer and RNG states (Accelerate's `save_state`) and a progress file, written last, that marks the
checkpoint complete. The progress file also records the run's identity (`surgical_peft.training.identity`): its
settings, data and Accelerate's settings, which a rerun must share to resume it.

From the first epoch on, a complete checkpoint exists at every instant, whenever the process is killed: a new one is
written, flushed to disk (fsync), marked complete by its progress file (written to a temporary file, flushed and
renamed into place), and only then are the older ones deleted. A disk that fills up while a checkpoint is written
raises an `OSError` (ENOSPC) that says so, naming the checkpoint, about how much it needs and how much was free; the
incomplete checkpoint is removed. A rerun resumes from the newest complete checkpoint;
incomplete ones (no progress file) are never read, and entries of `checkpoints/` that are not `checkpoint_<n>`
directories (`.DS_Store`, a `checkpoint_backup/` of the user's) are left alone, as is a `checkpoint_<n>` directory
holding anything a checkpoint does not (a user's `notes.txt`: a warning says so).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> output_dir = Path(tempfile.mkdtemp())
    >>> (output_dir / "checkpoints" / "checkpoint_backup").mkdir(parents=True)
    >>> (output_dir / "checkpoints" / "checkpoint_3").mkdir()  # a write that was killed: no progress file
    >>> latest_checkpoint(output_dir) is None
    True
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator

from ..errors import InputError
from ..files import fsync, reporting_full_disk, write_file
from ..tuner.layer import deduplicate_state_dict

if TYPE_CHECKING:
    from .strategies._base import Phase

__all__ = ["Progress", "latest_checkpoint", "load_checkpoint", "save_checkpoint"]

_PROGRESS_FILE = "progress.json"
_NAME = re.compile(r"checkpoint_(\d+)")
# What Accelerate's `save_state` writes (accelerate.utils.constants: model, pytorch_model, optimizer, scheduler,
# sampler, random_states, scaler, custom_checkpoint; FSDP: directories of those names) and the progress file.
_OWN_ENTRY = re.compile(
    r"(model|pytorch_model|optimizer|scheduler|sampler|random_states|scaler|custom_checkpoint)(_\w+)?(\.\w+)?"
    rf"|{re.escape(_PROGRESS_FILE)}|\.{re.escape(_PROGRESS_FILE)}\.\w+\.partial"  # (and `files.write_file`'s staging)
)


@dataclass
class Progress:
    """Where a run stands: the phase it is in, epochs done per phase, the per-epoch history, and what the run is
    (`identity`: an `identity.RunIdentity` as a dict; empty in a checkpoint of an earlier version)."""

    phase: int = 0
    epochs_done: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    identity: dict[str, Any] = field(default_factory=dict)

    @property
    def number(self) -> int:
        """The number of the checkpoint that holds this progress: the epochs done over every phase, from 0."""
        return sum(self.epochs_done) - 1

    def epochs_of(self, phases: Sequence[Phase]) -> tuple[int, int]:
        """The epochs done and the epochs of the whole run, over the run's `phases` (which a rerun may have made
        longer: a phase before the current one is over, whatever its epochs are now).

        Example:
            >>> from surgical_peft.training.strategies._base import Phase
            >>> Progress(phase=0, epochs_done=[1]).epochs_of([Phase("fine-tune", ["stage1"], 3, 1e-3)])
            (1, 3)
        """
        done = sum(self.epochs_done)
        left = 0
        for index, phase in enumerate(phases):
            ran = self.epochs_done[index] if index < len(self.epochs_done) else 0
            left += 0 if index < self.phase else max(phase.epochs - ran, 0)
        return done, done + left


def _checkpoints(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The `checkpoint_<n>` directories under `output_dir/checkpoints`, oldest first; anything else is ignored."""
    root = Path(output_dir, "checkpoints")
    if not root.is_dir():
        return []
    found = [(int(match[1]), path) for path in root.iterdir() if (match := _NAME.fullmatch(path.name))]
    return [path for _, path in sorted(found) if path.is_dir()]


def latest_checkpoint(output_dir: str | os.PathLike[str] | None) -> tuple[Path, Progress] | None:
    """The newest complete checkpoint under `output_dir/checkpoints` and the progress saved with it, if any."""
    if output_dir is None:
        return None
    for checkpoint in reversed(_checkpoints(output_dir)):
        if (checkpoint / _PROGRESS_FILE).is_file():  # written last: a checkpoint without it is incomplete
            try:
                return checkpoint, Progress(**json.loads((checkpoint / _PROGRESS_FILE).read_text()))
            except (UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:  # (TypeError: other fields)
                raise _damaged(checkpoint, error) from error
    return None


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> None:
    """Restore model, optimizer and RNG states from a complete checkpoint (Accelerate's `load_state`).

    Raises:
        InputError: if a file of the checkpoint cannot be read back (damaged since it was written), naming it.
    """
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as error:  # safetensors, torch and pickle raise many types on a damaged file
        raise _damaged(checkpoint, error) from error


def _damaged(checkpoint: Path, error: Exception) -> InputError:
    return InputError(
        f"The checkpoint {checkpoint} cannot be read back ({type(error).__name__}: {error}): it was damaged after it "
        "was written. Delete it and rerun: the run then resumes from an earlier complete checkpoint, or starts over."
    )


def _mark_complete(checkpoint: Path, progress: Progress) -> None:
    """Flush every file of `checkpoint` to disk, then write its progress file atomically."""
    for path in sorted(checkpoint.rglob("*"), reverse=True):  # files before the directories that hold them
        fsync(path)
    fsync(checkpoint)
    write_file(checkpoint / _PROGRESS_FILE, json.dumps(asdict(progress), indent=1))
    fsync(checkpoint.parent)


def _foreign_entries(checkpoint: Path) -> list[str]:
    """The entries of `checkpoint` that neither Accelerate's `save_state` nor this module writes (a user's files)."""
    return sorted(entry.name for entry in checkpoint.iterdir() if not _OWN_ENTRY.fullmatch(entry.name))


def _remove(checkpoint: Path) -> None:
    """Delete a checkpoint, its progress file first (so that a kill half-way leaves it incomplete, not corrupt); one
    that holds anything a checkpoint does not (a user's notes) is left alone, with a warning."""
    foreign = _foreign_entries(checkpoint)
    if foreign:
        warnings.warn(
            f"{checkpoint} holds files no checkpoint writes ({', '.join(foreign[:3])}): left alone.", stacklevel=3
        )
        return
    (checkpoint / _PROGRESS_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint)


def _deduplicate(models: list[Any], state_dicts: list[dict[str, Any]], output_dir: str) -> None:
    """Accelerate's hook before `save_state` writes the models' state dicts: one name per tensor
    (`surgical_peft.tuner.layer.deduplicate_state_dict`), where a `PeftModel` names each tuned tensor twice and
    Accelerate would drop one name itself, warning "Removed shared tensor ... while saving" at every epoch. Under FSDP
    and DeepSpeed, Accelerate saves the models its own way and `state_dicts` is empty."""
    for model, state_dict in zip(models, state_dicts, strict=False):  # (state_dicts is empty under FSDP)
        deduplicate_state_dict(model, state_dict)


_FREED = (
    "The incomplete checkpoint was removed; free some space and rerun: the run resumes from its last complete one."
)


def _checkpoint_bytes(accelerator: Accelerator, output_dir: str | os.PathLike[str]) -> int:
    """About what `save_state` writes: the size of the newest complete checkpoint, or before the first one the bytes
    of the prepared models' tensors and of the optimizers' states (this process's: no collective call, which could
    wait forever where only one process failed)."""
    latest = latest_checkpoint(output_dir)
    if latest is not None:
        return sum(path.stat().st_size for path in latest[0].rglob("*") if path.is_file())
    tensors = [t for model in accelerator._models for t in chain(model.parameters(), model.buffers())]
    states = (
        value
        for optimizer in accelerator._optimizers
        for state in optimizer.state.values()
        for value in state.values()
    )
    tensors += [value for value in states if isinstance(value, torch.Tensor)]
    unique = {id(tensor): tensor for tensor in tensors}.values()  # (tied weights are saved once)
    return sum(tensor.numel() * tensor.element_size() for tensor in unique)


def save_checkpoint(accelerator: Accelerator, output_dir: str | os.PathLike[str], progress: Progress) -> Path:
    """Save model, optimizer and RNG states as checkpoint `progress.number`, mark it complete, then delete the older
    checkpoints. Every process calls it; the main process writes the progress file and deletes. Returns its path."""
    checkpoint = Path(output_dir, "checkpoints", f"checkpoint_{progress.number}")
    if accelerator.is_main_process and checkpoint.exists():  # left incomplete by a killed run (never a complete one)
        _remove(checkpoint)
    accelerator.wait_for_everyone()
    hook = accelerator.register_save_state_pre_hook(_deduplicate)
    try:
        with reporting_full_disk(
            checkpoint, "the checkpoint", lambda: _checkpoint_bytes(accelerator, output_dir), _FREED
        ):
            accelerator.save_state(output_dir=str(checkpoint))
    except Exception:
        if accelerator.is_main_process and checkpoint.exists():  # incomplete: never read; its space is freed
            _remove(checkpoint)
        raise
    finally:
        hook.remove()
    accelerator.wait_for_everyone()  # every process has written its part
    if accelerator.is_main_process:
        _mark_complete(checkpoint, progress)
        for older in _checkpoints(output_dir):
            if older != checkpoint:
                _remove(older)
    accelerator.wait_for_everyone()
    return checkpoint
