"""Checkpoints of a run, one per epoch under `<output_dir>/checkpoints`: model, optimizer and RNG states (Accelerate's
`save_state`) and a progress file, written last, that marks the checkpoint complete."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator

__all__ = ["Progress", "latest_checkpoint", "save_checkpoint"]

_PROGRESS_FILE = "progress.json"


@dataclass
class Progress:
    """Where a run stands: the phase it is in, epochs done per phase, and the per-epoch history."""

    phase: int = 0
    epochs_done: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


def latest_checkpoint(output_dir: str | None) -> tuple[Path, Progress] | None:
    """The newest complete checkpoint under `output_dir/checkpoints` and the progress saved with it, if any."""
    if output_dir is None:
        return None
    candidates = sorted(Path(output_dir, "checkpoints").glob("checkpoint_*"), key=lambda p: int(p.name.split("_")[-1]))
    for checkpoint in reversed(candidates):
        if (checkpoint / _PROGRESS_FILE).is_file():  # written last: a checkpoint without it is incomplete
            return checkpoint, Progress(**json.loads((checkpoint / _PROGRESS_FILE).read_text()))
    return None


def save_checkpoint(accelerator: Accelerator, progress: Progress) -> None:
    """Save model, optimizer and RNG states, then the progress file that marks the checkpoint complete."""
    location = Path(accelerator.save_state())
    if accelerator.is_main_process:
        record = {"phase": progress.phase, "epochs_done": progress.epochs_done, "history": progress.history}
        (location / _PROGRESS_FILE).write_text(json.dumps(record, indent=1))
    accelerator.wait_for_everyone()
