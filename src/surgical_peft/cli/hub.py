"""The command line's side of the Hub: the check before a run that ends in a push, and a push that, when it fails,
says where the adapter is and how to push it later (`surgical-peft push`).

Example (needs network and a token)::

    repo_id = check_hub("my-run")  # before training: exit 2 at once when offline or without a write token
    url = push_saved("outputs/my-run/adapter", repo_id)
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, SurgicalPeftError

__all__ = ["check_hub", "push_saved"]


def check_hub(repo_id: str) -> str:
    """`surgical_peft.hub.check_push_access(repo_id)`: the full repository id, or an `InputError` (exit status 2)."""
    from ..hub import check_push_access

    return check_push_access(repo_id)


def push_saved(
    directory: str | os.PathLike[str], repo_id: str, *, private: bool | None = None, commit_message: str | None = None
) -> str:
    """Upload the adapter saved in `directory` (`surgical_peft.hub.push_saved_adapter`); returns the commit's URL.

    Raises:
        InputError: when `directory` holds no adapter.
        SurgicalPeftError: when the upload fails (no network, a refused token, ...): the message names the error,
            where the adapter is, and the command that pushes it later.
    """
    from ..hub import push_saved_adapter

    options = {"commit_message": commit_message} if commit_message else {}
    try:
        return push_saved_adapter(directory, repo_id, private=private, **options)
    except InputError:
        raise
    except Exception as error:  # whatever the upload met (network, HTTP, disk), the adapter stays where it is
        reason = str(error).splitlines()[0] if str(error) else ""
        raise SurgicalPeftError(
            f"pushing to the Hub repository {repo_id} failed ({type(error).__name__}: {reason}). The adapter is "
            f"saved in {Path(directory)}; push it later with: surgical-peft push {directory} {repo_id}"
        ) from error
