"""The package's errors: one base class, so that a caller (or the command line) can catch everything it raises.

`InputError` is a `ValueError`: a bad value or combination given by the caller (a block name, a shift, a learning
rate, a directory), found before anything is changed. Its message names the bad value and the valid choices. The
command line reports it as one line and exit status 2.

Example:
    >>> from surgical_peft.errors import InputError, SurgicalPeftError
    >>> issubclass(InputError, SurgicalPeftError) and issubclass(InputError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["InputError", "SurgicalPeftError"]


class SurgicalPeftError(Exception):
    """Base class of every error surgical-peft raises on purpose."""


class InputError(SurgicalPeftError, ValueError):
    """Bad input, found before anything was changed; the message names the problem and the valid choices."""
