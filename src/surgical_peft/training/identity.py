"""What a run is, as its checkpoints record it, and what a rerun may change and still resume it.

Every checkpoint records the run's identity (`RunIdentity`): the settings that define it (`FineTuneArguments.identity`,
widened by a caller's own, e.g. the command line's model and data options), a fingerprint of its data
(`surgical_peft.data_fingerprint`, when the caller gives one), and the settings Accelerate resolved for it, from the
arguments, the environment or `accelerate launch` and its config file (`accelerate_settings`). A rerun resumes a
checkpoint only under the same identity, and only to train more epochs (`check_resumable`): anything else is refused
before any state is loaded, naming what differs, with both values and, for Accelerate's settings, where the new one
came from. A checkpoint that records no identity (written by an earlier version) cannot be checked, and is refused.

Example:
    >>> from surgical_peft.training.checkpoint import Progress
    >>> from surgical_peft.training.strategies._base import Phase
    >>> recorded = Progress(epochs_done=[3], identity={"settings": {"lr": 0.01}})
    >>> check_resumable(Path("run"), recorded, RunIdentity({"lr": 0.003}), [Phase("fine-tune", ["head"], 3, 0.003)])
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: run holds checkpoints of another run, which cannot be resumed: --lr 0.01 there...
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data_fingerprint import describe_data_change
from ..errors import InputError

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .arguments import FineTuneArguments
    from .checkpoint import Progress
    from .strategies._base import Phase

__all__ = ["RunIdentity", "accelerate_settings", "check_resumable"]

_ENVIRONMENT = {  # Accelerate's environment variables (which `accelerate launch` sets from its config file)
    "mixed_precision": "ACCELERATE_MIXED_PRECISION",
    "gradient_accumulation_steps": "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
    "num_processes": "WORLD_SIZE",
}
_LONGEST_VALUE = 80  # characters of a value a message shows


@dataclass
class RunIdentity:
    """What defines a run: its settings (option names and values), a fingerprint of its data (`None`: not recorded)
    and the settings Accelerate resolved (`accelerate_settings`; `None`: not yet known, e.g. in a dry run)."""

    settings: dict[str, Any]
    data: dict[str, Any] | None = None
    accelerate: dict[str, Any] | None = None


def accelerate_settings(accelerator: Accelerator) -> dict[str, Any]:
    """The settings `accelerator` resolved that change what a run computes: mixed precision, gradient accumulation,
    the number of processes and how they are set up.

    Example:
        >>> from accelerate import Accelerator
        >>> accelerate_settings(Accelerator())
        {'mixed_precision': 'no', 'gradient_accumulation_steps': 1, 'num_processes': 1, 'distributed_type': 'NO'}
    """
    return {
        "mixed_precision": accelerator.mixed_precision,
        "gradient_accumulation_steps": accelerator.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.value,
    }


def _source(name: str, args: FineTuneArguments) -> str:
    """Where the value Accelerate resolved for setting `name` came from."""
    variable = _ENVIRONMENT.get(name)
    from_environment = variable is not None and variable in os.environ
    if name == "mixed_precision" and args.mixed_precision is not None:  # the argument comes before the environment
        return f"from mixed_precision={args.mixed_precision!r} (--mixed-precision)"
    if name == "num_processes" and not from_environment:
        return "one process, started without accelerate launch or torchrun"
    if from_environment:  # (it comes before the argument for gradient accumulation)
        return (
            f"from {variable}={os.environ[variable]} in the environment (set there, or by accelerate launch, from its "
            "options or config file)"
        )
    if name == "gradient_accumulation_steps":
        return f"from gradient_accumulation_steps={args.gradient_accumulation_steps} (--gradient-accumulation-steps)"
    return "Accelerate's default" if name == "mixed_precision" else "as accelerate launch set the processes up"


def _show(value: Any) -> str:
    text = ", ".join(map(str, value)) if isinstance(value, list) else str(value)
    return text if len(text) <= _LONGEST_VALUE else f"{text[: _LONGEST_VALUE - 3]}..."


def _differences(recorded: Mapping[str, Any], current: RunIdentity, args: FineTuneArguments | None) -> list[str]:
    """What differs between the identity a checkpoint recorded and the current one, in words."""
    settings = recorded.get("settings", {})
    found = [
        f"--{name.replace('_', '-')} {_show(settings[name]) if name in settings else '(not set)'} there, "
        f"{_show(current.settings[name]) if name in current.settings else '(not set)'} now"
        for name in sorted(settings.keys() | current.settings.keys())
        if settings.get(name) != current.settings.get(name)
    ]
    if current.data is not None and (change := describe_data_change(recorded.get("data") or {}, current.data)):
        found.append(f"the data changed since: {change}")
    resolved = recorded.get("accelerate") or {}
    for name, value in (current.accelerate or {}).items():
        if resolved.get(name) != value:
            source = f", {_source(name, args)}" if args is not None else ""
            found.append(f"Accelerate's {name} {_show(resolved.get(name))} there, {_show(value)} now{source}")
    return found


def _shortened(progress: Progress, phases: Sequence[Phase]) -> list[str]:
    """The phases a rerun asking for `phases` would shorten, or change once over, in words."""
    found = []
    for index in range(max(len(phases), len(progress.epochs_done))):
        done = progress.epochs_done[index] if index < len(progress.epochs_done) else 0
        asked = phases[index].epochs if index < len(phases) else 0
        name = phases[index].name if index < len(phases) else f"phase {index + 1}"
        if done > asked:
            found.append(f"{done} epoch(s) of {name} trained, {asked} asked for now")
        elif index < progress.phase and done != asked:
            found.append(f"{name} is over after {done} epoch(s), {asked} asked for now")
    return found


def check_resumable(
    output_dir: Path,
    progress: Progress,
    identity: RunIdentity,
    phases: Sequence[Phase],
    args: FineTuneArguments | None = None,
) -> None:
    """Refuse to resume the run whose latest checkpoint in `output_dir` holds `progress` as a run of `identity` and
    `phases` (`args`, if given, says where Accelerate's settings came from) unless it is the same run, asked for more
    epochs or as many.

    Raises:
        InputError: naming each setting that differs (with both values), how the data changed, or the phases that
            would be shortened; or for a checkpoint that records no identity.
    """
    start_over = f"pass another output directory (--output-dir), or delete {output_dir} to start over"
    if not progress.identity:
        raise InputError(
            f"{output_dir} holds checkpoints that record no settings (an earlier version of surgical-peft wrote "
            f"them): they cannot be checked to be this run's. To resume them, use that version; otherwise "
            f"{start_over}."
        )
    differences = _differences(progress.identity, identity, args)
    if differences:
        raise InputError(
            f"{output_dir} holds checkpoints of another run, which cannot be resumed: {'; '.join(differences)}. "
            f"Rerun with that run's settings and data to resume it, or {start_over}."
        )
    shortened = _shortened(progress, phases)
    if shortened:
        raise InputError(
            f"The run in {output_dir} has trained {sum(progress.epochs_done)} epoch(s), and a run can be extended, "
            f"not shortened or changed where it is over: {'; '.join(shortened)}. Ask for at least the epochs it has "
            f"trained (--epochs, --lp-epochs) to keep it, or {start_over}."
        )
