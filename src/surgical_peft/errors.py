"""The package's errors: one base class, so that a caller (or the command line) can catch everything it raises.

`InputError` is a `ValueError`: a bad value or combination given by the caller (a block name, a shift, a learning
rate, a directory), found before anything is changed. Its message names the bad value and the valid choices. The
command line reports it as one line and exit status 2. `NotAPeftConfigError` is the `InputError` for a JSON file read
as an adapter config that is no PEFT config (no `peft_type`): a `TypeError` too, as PEFT raises there.
`TrainingError`: training had to stop (a non-finite loss); nothing of the failed epoch is saved. `Interrupted`:
someone stopped a run (Ctrl-C); the command line reports where it can resume, with exit status 130.

Example:
    >>> from surgical_peft.errors import InputError, NotAPeftConfigError, SurgicalPeftError
    >>> issubclass(InputError, SurgicalPeftError) and issubclass(InputError, ValueError)
    True
    >>> issubclass(NotAPeftConfigError, InputError) and issubclass(NotAPeftConfigError, TypeError)
    True
"""

from __future__ import annotations

import shlex
from collections.abc import Collection
from itertools import islice

__all__ = ["InputError", "Interrupted", "NotAPeftConfigError", "SurgicalPeftError", "TrainingError", "few"]

_SHOWN_CHARACTERS = 100  # of one value in a message


class SurgicalPeftError(Exception):
    """Base class of every error surgical-peft raises on purpose.

    Example:
        >>> from surgical_peft.training import FineTuneArguments
        >>> try:
        ...     FineTuneArguments(epochs=0)
        ... except SurgicalPeftError as error:
        ...     print(f"{type(error).__name__}: {error}")
        InputError: epochs must be at least 1, got 0.
    """


class InputError(SurgicalPeftError, ValueError):
    """Bad input, found before anything was changed; the message names the problem and the valid choices.

    Example:
        >>> from surgical_peft.privacy import PrivacyArguments
        >>> try:
        ...     PrivacyArguments(epsilon=1.0, delta=2.0)
        ... except ValueError as error:  # an InputError is a ValueError
        ...     print(error)
        delta must be in (0, 1), got 2.0.
    """


class NotAPeftConfigError(InputError, TypeError):
    """A JSON file read as an adapter config holds no `peft_type`: PEFT's "missing required keys" `TypeError`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from surgical_peft import SurgicalConfig
        >>> directory = Path(tempfile.mkdtemp())
        >>> _ = (directory / "adapter_config.json").write_text('{"block": "stage1"}')
        >>> SurgicalConfig.from_pretrained(directory)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.NotAPeftConfigError: /...json: ... is missing required keys: {'peft_type'}. ...
    """


class TrainingError(SurgicalPeftError):
    """Training stopped (e.g. a non-finite loss); the message names where, and nothing of that epoch was saved.

    Example:
        >>> import torch
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft.training import FineTuneArguments, fine_tune
        >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> broken = [{"pixel_values": torch.full((3, 16, 16), float("nan")), "labels": i % 2} for i in range(4)]
        >>> args = FineTuneArguments(epochs=1, batch_size=2, progress=False)
        >>> fine_tune(model, broken, args=args)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.TrainingError: Training stopped in fine-tune epoch 1/1: the loss is not finite ...
    """


class Interrupted(SurgicalPeftError):
    """A run was interrupted (Ctrl-C, SIGINT); the message names the last complete checkpoint, which a rerun of the
    same command resumes from.

    Example:
        >>> try:
        ...     raise Interrupted("the last complete checkpoint is run/checkpoint_1.")
        ... except SurgicalPeftError as error:
        ...     print(error.resume_line(["surgical-peft", "train", "--output-dir", "run"]))
        interrupted: the last complete checkpoint is run/checkpoint_1. To resume: surgical-peft train --output-dir run
    """

    def resume_line(self, command: list[str]) -> str:
        """The one line a command line prints: what was interrupted, where it stands, and `command` to resume it.

        Example:
            >>> Interrupted("the last complete checkpoint is run/checkpoint_0.").resume_line(["train", "x y"])
            "interrupted: the last complete checkpoint is run/checkpoint_0. To resume: train 'x y'"
        """
        return f"interrupted: {self} To resume: {shlex.join(command)}"


def few(values: Collection[object], limit: int = 3) -> str:
    """`values` as a message names them: the first `limit`, each cut to 100 characters, and the count if there are
    more (a list of a million module names, or a 10 MB name, reads as one line).

    Example:
        >>> few(["stage1", "stage2"])
        "'stage1', 'stage2'"
        >>> few([f"m{index}" for index in range(1_000_000)])
        "'m0', 'm1', 'm2', ... (1,000,000 in all)"
        >>> len(few(["x" * 10_000_000]))
        100
    """
    shown = [format(repr(value), f".{_SHOWN_CHARACTERS}") for value in islice(values, limit)]
    more = f", ... ({len(values):,} in all)" if len(values) > limit else ""
    return ", ".join(shown) + more
