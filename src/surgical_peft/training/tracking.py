"""Experiment tracking, as transformers names it (`report_to`), through Accelerate's trackers.

`FineTuneArguments(report_to=...)` names the trackers: `"tensorboard"`, `"trackio"`, `"wandb"`, `"mlflow"`, a list of
them, `"all"` (every one of them that is installed) or `"none"` (the default). Each is an optional extra
(`pip install 'surgical-peft[tensorboard]'`); asking for one that is not installed raises an `InputError` with that
command, before anything runs.

A `fine_tune` call that makes its own `Accelerator` starts the trackers (`Accelerator(log_with=...)`,
`init_trackers`) with the run's settings, logs after every epoch's checkpoint the training loss, the eval accuracy
and the phase's learning rate (`train/loss`, `eval/accuracy`, `train/learning_rate`) at step = the epochs done over
every phase, and closes them when it ends, however it ends. Where things go:

| tracker | project | run | where |
|---|---|---|---|
| tensorboard | `surgical-peft` | | `<output_dir>/runs/surgical-peft/` (`./runs/...` without an `output_dir`) |
| trackio | `surgical-peft` | `run_name` | trackio's local store (`$TRACKIO_DIR`, else `$HF_HOME/trackio`) |
| wandb | `surgical-peft` | `run_name` | wandb's (`WANDB_MODE=offline` keeps it local) |
| mlflow | `surgical-peft` (or `$MLFLOW_EXPERIMENT_NAME`) | `run_name` | mlflow's (`./mlruns` by default) |

`run_name` defaults to the output directory's name. A resumed run continues its steps where its checkpoint stands,
in the same TensorBoard directory and the same trackio run; an epoch that a kill interrupted is logged when it runs
again, as it was never logged before (logging follows the checkpoint).

Example:
    >>> resolve_report_to("none"), resolve_report_to(None)
    ([], [])
    >>> resolve_report_to("neptune")
    Traceback (most recent call last):
    ...
    surgical_peft.errors.InputError: Unknown report_to 'neptune'. Valid: tensorboard, trackio, wandb, mlflow, all, ...
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .arguments import FineTuneArguments

__all__ = ["PROJECT", "REPORT_TO", "TRACKERS", "RunTracker", "project_configuration", "resolve_report_to"]

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb", "mlflow": "mlflow"}
"""Each tracker `report_to` may name -> the module that must be importable for it (each an extra of the package)."""

REPORT_TO = (*TRACKERS, "all", "none")
"""The values `report_to` takes (alone, or trackers in a list)."""

PROJECT = "surgical-peft"
"""The project (TensorBoard's directory, trackio's and wandb's project, mlflow's experiment) runs are logged under."""


def _installed(tracker: str) -> bool:
    return importlib.util.find_spec(TRACKERS[tracker]) is not None


def resolve_report_to(report_to: str | Sequence[str] | None) -> list[str]:
    """The trackers `report_to` asks for: `"all"`, every installed one; `"none"` or `None`, none.

    Raises:
        InputError: for a name not in `REPORT_TO`, `"all"` or `"none"` beside other names, or a tracker that is not
            installed (the message gives the pip command).
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in REPORT_TO:
            raise InputError(f"Unknown report_to {name!r}. Valid: {', '.join(REPORT_TO)}.")
    if len(names) > 1 and {"all", "none"} & set(names):
        raise InputError(f"report_to={names}: 'all' and 'none' stand alone; name trackers without them.")
    if names == ["all"]:
        return [tracker for tracker in TRACKERS if _installed(tracker)]
    missing = [tracker for tracker in names if tracker != "none" and not _installed(tracker)]
    if missing:
        extras = ",".join(missing)
        raise InputError(
            f"report_to: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'surgical-peft[{extras}]'"
        )
    return [name for name in dict.fromkeys(names) if name != "none"]


def project_configuration(args: FineTuneArguments) -> ProjectConfiguration:
    """Where Accelerate's trackers that write files keep them: `<output_dir>/runs` (TensorBoard)."""
    from accelerate.utils import ProjectConfiguration

    root = Path(args.output_dir or ".")
    return ProjectConfiguration(project_dir=str(root), logging_dir=str(root / "runs"))


def _loggable(value: Any) -> bool | int | float | str:
    """A setting as every tracker takes it (TensorBoard's hyperparameters: bool, int, float or str)."""
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value))
    return str(value)


def _settings(args: FineTuneArguments, extra: Mapping[str, Any] | None) -> dict[str, bool | int | float | str]:
    """The run's settings to log: every field of `args` (a private run's budget as `privacy_<field>`; data left out)
    and `extra`, such as the command line's model and data options."""
    settings: dict[str, Any] = {}
    for field in dataclasses.fields(args):
        value = getattr(args, field.name)
        if field.name == "privacy" and value is not None:
            settings.update({f"privacy_{f.name}": getattr(value, f.name) for f in dataclasses.fields(value) if f.repr})
        elif field.repr:  # (unlabeled_dataset is data, not a setting)
            settings[field.name] = value
    settings.update(extra or {})
    return {name: _loggable(value) for name, value in settings.items() if value is not None}


class RunTracker:
    """The trackers of one `fine_tune` run: started with the run's settings, one entry per epoch, closed at the end.

    Without trackers (`report_to="none"`, or an accelerator `fine_tune` did not make), every method does nothing.
    """

    def __init__(
        self, accelerator: Accelerator, args: FineTuneArguments, settings: Mapping[str, Any] | None = None
    ) -> None:
        """Start the trackers `accelerator` was made with (`log_with`), logging `args` and `settings`."""
        self.accelerator = accelerator
        self.active = bool(args.report_to)
        if not self.active:
            return
        run_name = args.run_name or (Path(args.output_dir).name if args.output_dir else None)
        named = {"name": run_name} if run_name else {}
        init_kwargs = {
            "trackio": {**named, "resume": "allow"},  # a resumed run goes on in the same trackio run
            "wandb": named,
            "mlflow": {"run_name": run_name} if run_name else {},
        }
        accelerator.init_trackers(PROJECT, config=_settings(args, settings), init_kwargs=init_kwargs)

    def log_epoch(self, record: Mapping[str, Any], step: int, learning_rate: float | None = None) -> None:
        """Log one epoch's `record` (a `FineTuneResult.history` entry) at `step`, the epochs done over every phase."""
        if not self.active:
            return
        values = {"train/loss": record.get("train_loss"), "eval/accuracy": record.get("eval_accuracy")}
        values["train/learning_rate"] = learning_rate
        self.accelerator.log({name: value for name, value in values.items() if value is not None}, step=step)

    def finish(self) -> None:
        """Close the trackers (flushing what they hold). Not `Accelerator.end_training`, which also destroys the
        process group: that belongs to the processes, which go on after `fine_tune` (the command line waits for
        every process once the adapter is saved)."""
        if not self.active:
            return
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers.clear()
        self.active = False
