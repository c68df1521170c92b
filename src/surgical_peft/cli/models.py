"""The one model loader of the command line: a Hub id, a local directory, or the built-in `demo-resnet`; with a
`LabelMap` (`surgical_peft.labels`), the model gets the labels it says: a new head for the dataset's classes, or the
dataset's names for labels transformers named `LABEL_<i>`.

Example:
    >>> import tempfile
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft.labels import match_labels
    >>> path = tempfile.mkdtemp()
    >>> config = ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1])  # 2 labels, LABEL_0 and LABEL_1
    >>> ResNetForImageClassification(config).save_pretrained(path)
    >>> labels = match_labels(["cat", "dog", "bird"], model_labels(path))
    >>> loaded = load_model(path, labels=labels)
    >>> loaded.model.config.num_labels, loaded.modules_to_save, loaded.input_size()
    (3, ['classifier'], None)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import transformers
from torch import nn
from transformers import AutoConfig, AutoModelForImageClassification, ResNetForImageClassification

from ..blocks import HEAD, list_blocks
from ..errors import InputError
from ..experiments import demo
from ..experiments.data import load_image_processor, preprocess
from ..labels import LabelMap

__all__ = ["ImageSize", "LoadedModel", "load_model", "model_labels"]

_HINT = (
    "Pass a Hub id (cached when offline), a local directory saved with save_pretrained, or the built-in "
    f"{demo.SOURCE_MODEL}."
)


class ImageSize(NamedTuple):
    """The side, in pixels, of the images a model is given, and where it came from (e.g. `"the model's config"`)."""

    pixels: int
    source: str

    def __str__(self) -> str:
        return f"{self.pixels}x{self.pixels} pixels ({self.source})"


@dataclass
class LoadedModel:
    """A loaded classifier, the directory or id it came from, its image processor (`None` when it ships none) and the
    modules it needs saved in full (a new head)."""

    model: nn.Module
    name_or_path: str
    processor: Any
    modules_to_save: list[str] | None = None

    def input_size(self) -> ImageSize | None:
        """The image side the model asks for: its image processor's, else its config's `image_size`, else a timm
        model's (transformers' TimmWrapper has no `image_size`); `None` when none of them says."""
        found = (
            (_processor_size(self.processor), "the model's image processor"),
            (getattr(self.model.config, "image_size", None), "the model's config"),
            (_timm_image_size(self.model), "the timm model's config"),
        )
        return next((ImageSize(int(pixels), source) for pixels, source in found if pixels), None)

    def preprocess(self, split: Any, image_size: ImageSize) -> Any:
        """`split` (columns `image`, `label`) as the model's `{"pixel_values", "labels"}` examples, of `image_size`:
        through the model's image processor where the size is the processor's, else resized here (normalised with the
        processor's mean and standard deviation, if it has one)."""
        from_processor = image_size.source == "the model's image processor"
        return preprocess(split, self.processor, image_size=None if from_processor else image_size.pixels)


def _processor_size(processor: Any) -> int | None:
    """The side of the images an image processor makes: its crop, else its size (`height`, else `shortest_edge`)."""
    if processor is None:
        return None
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    size = crop or getattr(processor, "size", None) or {}
    keys = ("height", "shortest_edge")  # of a dict, or of transformers 5's SizeDict
    sides = (size.get(key) if isinstance(size, dict) else getattr(size, key, None) for key in keys)
    return next((side for side in sides if side), None)


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


def model_labels(name: str) -> dict[int, str] | None:
    """The label names (by id) of the model `name` (a Hub id, a local directory or `demo-resnet`), from its config
    alone.

    Raises:
        InputError: if the model cannot be found.
    """
    config = demo.source_config() if name == demo.SOURCE_MODEL else _check_loadable(name)
    return dict(config.id2label) if getattr(config, "id2label", None) else None


def _new_head(name: str, labels: LabelMap) -> nn.Module:
    """The model `name` with a head for `labels`' classes, newly initialised (even where its size is the old one's);
    transformers' report of the head it re-initialised is not shown (the run's labels line says so)."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = AutoModelForImageClassification.from_pretrained(
            name, id2label=dict(enumerate(labels.model_names)), label2id=labels.label2id, ignore_mismatched_sizes=True
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    for path in _head(model):
        for module in model.get_submodule(path).modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return model


def load_model(
    name: str,
    *,
    labels: LabelMap | None = None,
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
        labels: how the dataset's classes meet the model's labels (`surgical_peft.labels.match_labels`): a new head
            for them is returned as `modules_to_save` (trained and saved in full); labels transformers named
            `LABEL_<i>` take the dataset's names.
        pretrained: `False` gives `demo-resnet`'s architecture without pretraining it (e.g. to list its blocks).
        state: Accelerate's process state, so that only the main process pretrains `demo-resnet`.
        progress: show the progress bars of pretraining `demo-resnet`.

    Raises:
        InputError: if the model cannot be loaded.
    """
    new_head = labels is not None and labels.new_head
    if name == demo.SOURCE_MODEL:
        if not pretrained:
            config = demo.source_config()
            if new_head:
                config.id2label, config.label2id = dict(enumerate(labels.model_names)), labels.label2id
            model = _with_label_names(ResNetForImageClassification(config), labels)
            return LoadedModel(model, name, None, _head(model) if new_head else None)
        name = _demo_model_path(shift, seed, cache_dir, state, progress)
    _check_loadable(name)
    processor = load_image_processor(name)
    if not new_head:
        model = AutoModelForImageClassification.from_pretrained(name)
        return LoadedModel(_with_label_names(model, labels), name, processor)
    model = _new_head(name, labels)
    return LoadedModel(model, name, processor, _head(model))


def _head(model: nn.Module) -> list[str]:
    """The module paths of the model's head."""
    return list(list_blocks(model).get(HEAD, ()))


def _with_label_names(model: nn.Module, labels: LabelMap | None) -> nn.Module:
    """`model`, its labels renamed to the dataset's where `labels` says they take them (`renamed`)."""
    if labels is not None and labels.kind == "renamed":
        model.config.id2label = dict(enumerate(labels.model_names))
        model.config.label2id = labels.label2id
    return model
