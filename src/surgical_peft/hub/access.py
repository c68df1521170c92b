"""Before any work that ends in a push: can this machine push to the Hub repository at all?

`check_push_access` asks the Hub who the token belongs to (`whoami`), which answers every question a push would meet
late: is the Hub switched off (`HF_HUB_OFFLINE=1`), is there a token, does the Hub answer, may the token write there.

Example (what `--push-to-hub` runs first; needs network and a token)::

    repo_id = check_push_access("resnet-stage1-fog")  # e.g. "me/resnet-stage1-fog"
"""

from __future__ import annotations

from typing import Any

from ..errors import InputError

__all__ = ["check_push_access"]


def _may_write(auth: dict[str, Any], namespace: str) -> bool:
    """Whether a token (`whoami`'s `auth`) may write to repositories of `namespace`: a write token, or a fine-grained
    one with `repo.write` on that namespace (or on every repository)."""
    token = auth.get("accessToken", {})
    if token.get("role") != "fineGrained":
        return token.get("role") != "read"
    grants = token.get("fineGrained", {})
    if "repo.write" in grants.get("global", []):
        return True
    return any(
        scope.get("entity", {}).get("name") == namespace and "repo.write" in scope.get("permissions", [])
        for scope in grants.get("scoped", [])
    )


def check_push_access(repo_id: str, *, token: str | None = None) -> str:
    """Check that `repo_id` (`"name"` or `"owner/name"`) can be pushed to, before the work that precedes the push;
    returns its full id (`"owner/name"`, a bare name in the token owner's namespace).

    Raises:
        InputError: when the Hub is switched off (`HF_HUB_OFFLINE`), there is no token (`hf auth login`,
            `HF_TOKEN`), the Hub cannot be reached or refuses the token, or the token may not write to the owner's
            repositories; the message says which, in one line.

    Example:
        >>> from unittest import mock
        >>> with mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):  # as with HF_HUB_OFFLINE=1
        ...     check_push_access("me/resnet-stage1-fog", token="hf_...")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: The Hub is switched off on this machine (HF_HUB_OFFLINE=1): ...
        >>> check_push_access("resnet-stage1-fog")  # with network and a token  # doctest: +SKIP
        'me/resnet-stage1-fog'
    """
    from huggingface_hub import HfApi, constants, get_token

    if constants.HF_HUB_OFFLINE:  # (read from the environment when huggingface_hub is imported)
        raise InputError(
            "The Hub is switched off on this machine (HF_HUB_OFFLINE=1): unset it to push, or leave the push out."
        )
    token = token or get_token()
    if token is None:
        raise InputError(
            "No Hugging Face token on this machine, and pushing needs one with write access: log in with "
            "'hf auth login' or set HF_TOKEN."
        )
    try:
        user = HfApi(token=token).whoami()
    except Exception as error:  # no network, a refused token: whatever it is, a push would meet it too
        message = str(error).splitlines()[0] if str(error) else ""
        raise InputError(
            f"Cannot push to the Hub: {constants.ENDPOINT} did not confirm the token ({type(error).__name__}: "
            f"{message}). Check the network and the token ('hf auth whoami')."
        ) from error
    owner, _, name = repo_id.rpartition("/")
    owner = owner or user["name"]
    if not _may_write(user.get("auth", {}), owner):
        raise InputError(
            f"The Hub token of {user['name']!r} may not write to {owner}/{name}: use a token with write access "
            "(https://huggingface.co/settings/tokens)."
        )
    return f"{owner}/{name}"
