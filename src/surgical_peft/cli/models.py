"""The one model loader of the command line: a Hub id, a local directory, or the built-in `demo-resnet`; with label
names, the classification head is re-initialised when their number differs.

Example:
    >>> import tempfile
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> path = tempfile.mkdtemp()
    >>> config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])  # 2 labels
    >>> ResNetForImageClassification(config).save_pretrained(path)
    >>> loaded = load_model(path, label_names=["cat", "dog", "bird"])
    >>> loaded.model.config.num_labels, loaded.modules_to_save, loaded.image_size
    (3, ['classifier'], 224)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, ResNetForImageClassification

from ..blocks import HEAD, list_blocks
from ..errors import InputError
from ..experiments import demo
from ..experiments.data import load_image_processor, preprocess

__all__ = ["LoadedModel", "load_model"]

_DEFAULT_IMAGE_SIZE = 224
_HINT = (
    "Pass a Hub id (cached when offline), a local directory saved with save_pretrained, or the built-in "
    f"{demo.SOURCE_MODEL}."
)


@dataclass
class LoadedModel:
    """A loaded classifier, the directory or id it came from, its image processor (`None` when it ships none) and the
    modules it needs saved in full (a re-initialised head)."""

    model: nn.Module
    name_or_path: str
    processor: Any
    modules_to_save: list[str] | None = None

    @property
    def image_size(self) -> int:
        """The side of the images the model takes: its config's `image_size`, else a timm model's (transformers'
        TimmWrapper has no `image_size`), else 224."""
        return getattr(self.model.config, "image_size", None) or _timm_image_size(self.model) or _DEFAULT_IMAGE_SIZE

    def preprocess(self, split: Any, image_size: int | None = None) -> Any:
        """`split` (columns `image`, `label`) as the model's `{"pixel_values", "labels"}` examples (images of
        `image_size` pixels, default: the model's, unless its image processor says otherwise)."""
        return preprocess(split, self.processor, image_size=image_size or self.image_size)


def _timm_image_size(model: nn.Module) -> int | None:
    """The image side a timm model (inside a TimmWrapper) takes: the size its patch embedding is fixed to (a ViT
    refuses any other), else the input size of its pretrained config; `None` for other models."""
    timm_model = getattr(model, "timm_model", None)
    fixed = getattr(getattr(timm_model, "patch_embed", None), "img_size", None)
    if isinstance(fixed, (tuple, list)) and fixed:
        return int(fixed[-1])
    input_size = (getattr(timm_model, "pretrained_cfg", None) or {}).get("input_size")
    return int(input_size[-1]) if input_size else None


def _demo_model_path(shift: str, seed: int, cache_dir: str | None, state: Any, progress: bool) -> str:
    """The demo's source model, pretrained (first on the main process, when there are several) and cached."""
    with state.main_process_first() if state is not None else contextlib.nullcontext():
        return str(demo.source_model(shift, seed=seed, cache_dir=cache_dir, progress=progress))


def _check_loadable(name: str) -> Any:
    looks_local = Path(name).is_absolute() or name.startswith((".", "~"))
    if looks_local and not Path(name).expanduser().is_dir():
        problem = "it is a file, not a directory" if Path(name).expanduser().exists() else "there is no such directory"
        raise InputError(f"Cannot load model {name!r}: {problem}. {_HINT}")
    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise InputError(f"Cannot load model {name!r}: {error} {_HINT}") from error


def load_model(
    name: str,
    *,
    label_names: list[str] | None = None,
    pretrained: bool = True,
    shift: str = "none",
    seed: int = 0,
    cache_dir: str | None = None,
    state: Any = None,
    progress: bool = True,
) -> LoadedModel:
    """Load the image classifier `name`.

    Args:
        name: a Hub id, a local directory, or `demo-resnet` (pretrained for `shift` and `seed`, cached in `cache_dir`).
        label_names: the dataset's labels; when their number differs from the model's, its head is re-initialised
            for them and returned as `modules_to_save` (trained and saved in full).
        pretrained: `False` gives `demo-resnet`'s architecture without pretraining it (e.g. to list its blocks).
        state: Accelerate's process state, so that only the main process pretrains `demo-resnet`.
        progress: show the progress bars of pretraining `demo-resnet`.

    Raises:
        InputError: if the model cannot be loaded.
    """
    if name == demo.SOURCE_MODEL:
        if not pretrained:
            return LoadedModel(ResNetForImageClassification(demo.source_config()), name, None)
        name = _demo_model_path(shift, seed, cache_dir, state, progress)
    config = _check_loadable(name)
    processor = load_image_processor(name)
    if label_names is None or config.num_labels == len(label_names):
        return LoadedModel(AutoModelForImageClassification.from_pretrained(name), name, processor)
    model = AutoModelForImageClassification.from_pretrained(
        name,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={label: index for index, label in enumerate(label_names)},
        ignore_mismatched_sizes=True,
    )
    return LoadedModel(model, name, processor, list(list_blocks(model).get(HEAD, ())))
