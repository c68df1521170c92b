"""Saving an adapter with its model card, and pushing it to the Hugging Face Hub in one commit.

`push_adapter` uploads a model's adapter with this package's card (`surgical_peft.hub.card`); `push_saved_adapter`
uploads an adapter directory as it was saved (a run's `adapter/`): what `surgical-peft push` runs, and how to push
later when a run's push failed. PEFT's own `model.push_to_hub(repo_id)` (transformers' `PushToHubMixin`) replaces the
README.md that `save_pretrained` writes with the card already in the Hub repository, or with transformers' generic
card when the repository has none: after one `push_adapter`, later `model.push_to_hub` calls keep this card; a first
`model.push_to_hub` to a new repository does not upload it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME

from ..errors import InputError
from ..tuner import save_adapter
from .card import CARD_NAME, render_model_card, write_model_card

__all__ = ["push_adapter", "push_saved_adapter", "save_adapter_with_card", "saved_adapter_directory"]


def save_adapter_with_card(model: Any, directory: str | os.PathLike[str], card: str) -> Path:
    """Save the adapter with its model card (`README.md`) through `surgical_peft.save_adapter`: each file replaced
    atomically, nothing else in `directory` touched.

    Example:
        >>> import tempfile, torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> path = save_adapter_with_card(model, tempfile.mkdtemp() + "/adapter", "---\\nlibrary_name: peft\\n---\\n")
        >>> (path / "README.md").read_text().splitlines()[1]
        'library_name: peft'
    """
    return save_adapter(model, directory, write_extra=lambda staging: write_model_card(staging, card))


def push_adapter(
    model: Any,
    repo_id: str,
    *,
    card: str | Mapping[str, Any] | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload surgical fine-tuning adapter",
) -> str:
    """Upload the adapter of `model` with its model card to the Hub repository `repo_id` (created if needed).

    The adapter is saved with the card into a temporary directory, then uploaded in one commit with
    `huggingface_hub.HfApi.upload_folder`.

    Args:
        model: a `PeftModel` with a surgical adapter.
        repo_id: `"user/name"`, or `"name"` in the token owner's namespace.
        card: the README.md to upload, as it is; or the keyword arguments of `render_model_card` (shift, dataset,
            recipe, metrics, license, eval_size), rendered for the repository (its full id in the title and the
            loading snippet); default: `render_model_card(model, repo_id=<the repository>)`.
        private: create the repository as private (ignored if it exists).
        token: a Hub token (default: the logged-in one, or `HF_TOKEN`).
        commit_message: the commit's message.

    Returns:
        The URL of the commit.

    Example:
        >>> import torch
        >>> from unittest import mock
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> with mock.patch("huggingface_hub.constants.HF_HUB_OFFLINE", True):  # as with HF_HUB_OFFLINE=1
        ...     push_adapter(model, "me/tiny-linear", card={"license": "apache-2.0"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        huggingface_hub.errors.OfflineModeIsEnabled: Cannot reach .../api/repos/create: offline mode is enabled. ...
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if not isinstance(card, str):
        card = render_model_card(model, **{**(card or {}), "repo_id": repo_id})
    with tempfile.TemporaryDirectory() as staging:
        folder = save_adapter_with_card(model, Path(staging) / "adapter", card)
        return _upload(api, folder, repo_id, commit_message)


def push_saved_adapter(
    directory: str | os.PathLike[str],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload surgical fine-tuning adapter",
) -> str:
    """Upload an adapter directory as it was saved (by `save_adapter_with_card`, `save_pretrained`, or a run's
    `adapter/`), its model card included, to the Hub repository `repo_id` (created if needed): how to push later what
    a run saved. Only the adapter's files (configs, weights, README.md, in subdirectories too) are uploaded.

    Returns:
        The URL of the commit.

    Raises:
        InputError: if `directory` holds no adapter (no `adapter_config.json`).

    Example:
        >>> import tempfile
        >>> push_saved_adapter(tempfile.mkdtemp(), "me/resnet-stage1")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: /... holds no adapter (adapter_config.json is missing): ...
        >>> push_saved_adapter("run/adapter", "me/resnet-stage1")  # with a token and network  # doctest: +SKIP
    """
    from huggingface_hub import HfApi

    folder = saved_adapter_directory(directory)
    api = HfApi(token=token)
    return _upload(api, folder, api.create_repo(repo_id, private=private, exist_ok=True).repo_id, commit_message)


def saved_adapter_directory(directory: str | os.PathLike[str]) -> Path:
    """`directory` as a `Path`, checked to hold a saved adapter (`adapter_config.json`), else an `InputError`.

    Example:
        >>> import tempfile
        >>> saved_adapter_directory(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: /... holds no adapter (adapter_config.json is missing): ...
    """
    folder = Path(directory)
    if not (folder / CONFIG_NAME).is_file():
        raise InputError(
            f"{folder} holds no adapter ({CONFIG_NAME} is missing): pass the directory an adapter was saved in, "
            "e.g. a run's <output-dir>/adapter."
        )
    return folder


def _upload(api: Any, folder: Path, repo_id: str, commit_message: str) -> str:
    """Upload the adapter files of `folder` to `repo_id` in one commit; returns the commit's URL."""
    patterns = [CARD_NAME, CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME]
    allowed = [*patterns, *(f"*/{pattern}" for pattern in patterns)]  # (several adapters: one subdirectory each)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, allow_patterns=allowed
    )
    return commit.commit_url
