"""The model card of a surgical adapter (README.md): rendered from the package's template, written in one place.

The card template is `model_card_template.md` beside this file (see `model_cards/README.md`); it is a Jinja template
rendered by `huggingface_hub.ModelCard.from_template`, with YAML front matter holding `base_model`,
`library_name: peft`, `license`, the `pipeline_tag` of the base model's task (`surgical_peft.hub.tasks`), `tags`
(`surgical-fine-tuning`, `block:<name>` for each tuned block, `shift:<name>`) and `datasets`, then the label names,
a loading snippet with the task's Auto class (after `import surgical_peft`, which registers the method), the training
recipe and a metrics table.

`write_model_card` is the one place a card file is written. PEFT's `save_pretrained` (and so `trainer.save_model`)
writes this card too: PEFT has no per-method hook for the card it writes first, so the tuner routes PEFT's
`PeftModel.create_or_update_model_card` and `save_pretrained` (`surgical_peft.tuner._internals.route_model_cards`):
for a surgical adapter (`owns_card`), `write_card_on_save` writes this card once the weights are saved, replacing an
earlier save's card or a symlink named README.md (which PEFT would write through); every other model, and a user's
own README.md, are left to PEFT.

Example:
    >>> import tempfile, torch
    >>> from peft import get_peft_model
    >>> from surgical_peft import SurgicalConfig
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
    >>> card = render_model_card(model, shift="gaussian_noise", recipe={"strategy": "surgical"})
    >>> print(card.splitlines()[1])
    library_name: peft
    >>> "shift:gaussian_noise" in card
    True
    >>> directory = tempfile.mkdtemp()
    >>> model.save_pretrained(directory)  # PEFT's save: this card, not PEFT's generic one
    >>> "import surgical_peft" in open(directory + "/README.md").read()
    True
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..blocks import format_bytes
from ..files import write_file
from .tasks import task_of

__all__ = [
    "BASE_MODEL_PLACEHOLDER",
    "CARD_NAME",
    "TEMPLATE_PATH",
    "adapter_size",
    "describe_adapter_size",
    "render_model_card",
    "owns_card",
    "write_card_on_save",
    "write_model_card",
]

CARD_NAME = "README.md"
"""The model card's file name in an adapter directory (on the Hub, the repository's card)."""

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
"""The model card template (Jinja, as `huggingface_hub.ModelCard.from_template` renders it)."""

_TAG = "surgical-fine-tuning"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
BASE_MODEL_PLACEHOLDER = "TODO/base-model-hub-id"
"""What a card shows in place of a base model that is no Hub id (a local path, or none recorded): replace it."""
_MAX_LABELS = 20  # label names shown on a card; more are counted


def _is_hub_id(name: str | None) -> bool:
    """Whether `name` reads as a Hub repository id (`"name"` or `"owner/name"`) and is no local path."""
    from ..experiments.data import DIGITS  # (imported here: saving a model must not import `datasets`)

    return bool(name) and name != DIGITS and bool(_HUB_ID.fullmatch(name)) and not os.path.exists(name)


def _label_names(model: Any, pipeline_tag: str | None) -> list[str]:
    """A classifier's label names from its config; `[]` for other models and for transformers' `LABEL_<i>`."""
    id2label = getattr(getattr(model.get_base_model(), "config", None), "id2label", None) or {}
    names = [str(id2label[index]) for index in sorted(id2label)]
    if not (pipeline_tag or "").endswith("classification") or all(re.fullmatch(r"LABEL_\d+", n) for n in names):
        return []
    return names


def _describe_dataset(dataset: str | None) -> str | None:
    from ..experiments.data import DIGITS

    if dataset is None:
        return None
    if dataset == DIGITS:
        return "scikit-learn's handwritten digits (8x8, upsampled to 32x32)"
    if _is_hub_id(dataset):
        return f"[`{dataset}`](https://huggingface.co/datasets/{dataset})"
    return f"a local dataset (`{Path(dataset).name}`)"


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def render_model_card(
    model: Any,
    *,
    shift: str | None = None,
    dataset: str | None = None,
    recipe: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    eval_size: int | None = None,
    new_labels: bool = False,
) -> str:
    """The model card (README.md) of a surgical adapter, rendered from `TEMPLATE_PATH`.

    The card's `pipeline_tag` and the Auto class of its usage snippet follow the base model's task
    (`surgical_peft.hub.tasks`); `base_model` is the Hub id the base was loaded from. A base loaded from a local path
    has no Hub id: the card shows `BASE_MODEL_PLACEHOLDER` instead, and a card for a Hub repository (`repo_id`
    given) warns about it.

    Args:
        model: a `PeftModel` with a surgical adapter (its active adapter is described).
        shift: the distribution shift of the target data, e.g. `"gaussian_noise"` (becomes a `shift:<name>` tag).
        dataset: the target dataset: a Hub id (listed under `datasets`), `"digits"` or a local path.
        recipe: training settings shown in the recipe table (strategy, learning rate, epochs, train-n, seed, ...).
        metrics: results shown in the metrics table (floats are shown with 4 significant digits).
        repo_id: the Hub repository the card is for (its title and the loading snippet).
        license: the adapter's license, a Hub license id (e.g. `"apache-2.0"`).
        eval_size: the number of examples the metrics were measured on.
        new_labels: the model's labels are not the base's (a new head, or names given to transformers' `LABEL_<i>`):
            the loading snippet gives the base its `id2label` (and, for a new head, `ignore_mismatched_sizes=True`),
            so that the loaded model names its predictions as the adapter was trained.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> card = render_model_card(model, metrics={"eval_accuracy": 0.912}, eval_size=500)
        >>> "| eval_accuracy | 0.912 |" in card, "measured on 500 evaluation examples" in card
        (True, True)
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = model.peft_config[model.active_adapter]
    blocks = config.blocks or list(config.target_modules or [])
    base = config.base_model_name_or_path  # what the base was loaded from (PEFT records its `name_or_path`)
    hub_base = base if _is_hub_id(base) else None
    if base and not hub_base and repo_id:
        warnings.warn(
            f"The base model was loaded from the local path {base!r}, which is no Hub id: the card for {repo_id} "
            f"names {BASE_MODEL_PLACEHOLDER!r} instead; replace it with the base model's Hub id.",
            stacklevel=2,
        )
    task = task_of(model.get_base_model())
    tags = [_TAG, *(f"block:{block}" for block in blocks), *([f"shift:{shift}"] if shift else [])]
    if hub_base:
        tags.append(f"base_model:adapter:{hub_base}")
    card_data = ModelCardData(
        base_model=hub_base,
        library_name="peft",
        license=license,
        pipeline_tag=task.pipeline_tag,
        tags=tags,
        datasets=[dataset] if _is_hub_id(dataset) else None,
    )
    labels = _label_names(model, task.pipeline_tag)
    keywords = ""
    if new_labels and labels:
        keywords = f"id2label={dict(enumerate(labels))!r}"
        keywords += ", ignore_mismatched_sizes=True" if config.modules_to_save else ""
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_id=repo_id,
        blocks=blocks,
        base_model=hub_base,
        local_base=None if hub_base else base,
        placeholder=BASE_MODEL_PLACEHOLDER,
        import_line=task.import_line,
        load_base=task.load(hub_base or BASE_MODEL_PLACEHOLDER, keywords),
        adapter_size=describe_adapter_size(model),
        shift=shift,
        dataset_description=_describe_dataset(dataset),
        labels=labels[:_MAX_LABELS],
        num_labels=len(labels),
        recipe={name: _format(value) for name, value in (recipe or {}).items()},
        metrics={name: _format(value) for name, value in (metrics or {}).items()},
        eval_size=eval_size,
        versions=_versions(),
    )
    return str(card)


def adapter_size(model: Any) -> tuple[int, int]:
    """The number of tensors the adapter of `model` (a `PeftModel`; its active adapter) saves, and their bytes (the
    bulk of `adapter_model.safetensors`).

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
        >>> adapter_size(model)
        (2, 80)
    """
    import peft

    deltas = peft.get_peft_model_state_dict(  # (save_embedding_layers="auto" would look the base up online)
        model, adapter_name=model.active_adapter, save_embedding_layers=False
    )
    return len(deltas), sum(tensor.numel() * tensor.element_size() for tensor in deltas.values())


def describe_adapter_size(model: Any) -> str:
    """`adapter_size` in words, e.g. `'2 tensors, 0.1 kB'`.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> base = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 300))
        >>> describe_adapter_size(get_peft_model(base, SurgicalConfig(target_modules=["1"])))
        '2 tensors, 6.0 kB'
    """
    tensors, size = adapter_size(model)
    return f"{tensors} tensors, {format_bytes(size)}"


def _versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {
        "surgical-peft": __version__,
        "PEFT": peft.__version__,
        "Transformers": transformers.__version__,
        "PyTorch": torch.__version__,
    }


def write_model_card(directory: str | os.PathLike[str], card: str) -> Path:
    """Write `card` as `directory/README.md`, replacing the file atomically (a temporary file in `directory`, then a
    rename, `surgical_peft.files.write_file`: never half-written, never written through a symlink at that name).
    Returns its path.

    Example:
        >>> import tempfile
        >>> write_model_card(tempfile.mkdtemp(), "---\\nlibrary_name: peft\\n---\\n").name
        'README.md'
    """
    return write_file(Path(directory) / CARD_NAME, card)


def owns_card(model: Any, directory: str | os.PathLike[str]) -> bool:
    """Whether PEFT's `save_pretrained` of `model` into `directory` writes this package's card (see the module
    docstring): for a `PeftModel` whose active adapter is a surgical one, where `directory` holds no README.md file,
    a card this package wrote (an earlier save's, which PEFT would rewrite as its own), or a symlink named README.md
    (PEFT would write through it, into the file it points to). A user's own README.md is left to PEFT, which updates
    it."""
    config = model.peft_config.get(model.active_adapter)
    if getattr(config, "peft_type", None) != "SURGICAL":
        return False
    existing = Path(directory, CARD_NAME)
    return existing.is_symlink() or not existing.exists() or _written_here(existing)


def _written_here(card: Path) -> bool:
    """Whether the card file `card` is one this package wrote (its front matter's tags hold `surgical-fine-tuning`)."""
    from huggingface_hub import ModelCard

    try:
        with card.open("rb") as file:
            if file.read(3) != b"---":  # no front matter (huggingface_hub would log that it found none)
                return False
        tags = ModelCard.load(card).data.tags or []
    except Exception:  # (not a card huggingface_hub can read: a user's file)
        return False
    return _TAG in tags


def write_card_on_save(model: Any, directory: str | os.PathLike[str]) -> None:
    """Write this package's card (`render_model_card`) for `model` into `directory`, as PEFT's `save_pretrained` does
    once the weights are saved, where `owns_card` says so."""
    write_model_card(directory, render_model_card(model))
