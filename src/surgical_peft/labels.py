"""Labels by name: how a dataset's classes meet a classifier's labels, so that a model never trains (or is scored) on
label ids that mean other classes to it.

`match_labels` compares the names, not the number: a dataset whose classes are the model's labels in another order
(or some of them) is mapped onto the model's ids; a model with transformers' default names (`LABEL_0`, ...) takes
the dataset's; real names that differ are refused, with the way out (a new head for the dataset's classes).
`check_label_names` is what `fine_tune` asks of a dataset that carries its class names. Names are compared as
`datasets.Dataset.align_labels_with_mapping` compares them, in lower case.

Example:
    >>> labels = match_labels(["circles", "squares", "stripes"], {0: "stripes", 1: "circles", 2: "squares"})
    >>> labels.kind, labels.model_ids
    ('permuted', {'circles': 1, 'squares': 2, 'stripes': 0})
    >>> print(labels.describe())  # doctest: +NORMALIZE_WHITESPACE
    Labels: the dataset's classes are the model's labels in another order: each image trains (and is scored) as the
    model's id for its class name: circles -> 1, squares -> 2, stripes -> 0.
    >>> match_labels(["cat", "dog"], {0: "LABEL_0", 1: "LABEL_1"}).model_names
    ('cat', 'dog')
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from .errors import InputError

__all__ = ["NEW_HEAD_OPTION", "LabelMap", "check_label_names", "dataset_label_names", "match_labels"]

NEW_HEAD_OPTION = "--new-head"
"""The command-line option that gives a model a new head for the dataset's classes (`ModelArguments.new_head`)."""

_DEFAULT_NAME = re.compile(r"LABEL_\d+")  # transformers' name for a label no one named
_SHOWN = 6  # names listed in a message; more are counted

Kind = Literal["same", "permuted", "subset", "renamed", "new-head"]


def _names(names: Sequence[str]) -> str:
    """A few names and how many there are in all."""
    shown = ", ".join(names[:_SHOWN])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _SHOWN else "")


def _key(name: str) -> str:
    return str(name).lower()


@dataclass(frozen=True)
class LabelMap:
    """How a dataset's classes meet a model's labels.

    Attributes:
        dataset_names: the dataset's class names, by its label id.
        model_names: the names of the trained model's labels, by id: the model's own, or the dataset's for a model that
            takes them (`renamed`) or gets a new head (`new-head`).
        kind: `same` (same names, same order), `permuted` (same names, another order), `subset` (the dataset's classes
            are some of the model's labels), `renamed` (the model's names were transformers' defaults and it takes the
            dataset's, keeping its head), `new-head` (a new head for the dataset's classes).
    """

    dataset_names: tuple[str, ...]
    model_names: tuple[str, ...]
    kind: Kind

    @property
    def new_head(self) -> bool:
        """Whether the model's head is re-initialised for the dataset's classes."""
        return self.kind == "new-head"

    @property
    def model_ids(self) -> dict[str, int]:
        """The model's label id of each of the dataset's classes, by name."""
        ids = {_key(name): index for index, name in enumerate(self.model_names)}
        return {name: ids[_key(name)] for name in self.dataset_names}

    @property
    def label2id(self) -> dict[str, int]:
        """The trained model's `label2id` (what `datasets.Dataset.align_labels_with_mapping` takes)."""
        return {name: index for index, name in enumerate(self.model_names)}

    def describe(self) -> str:
        """One line for a run's output: how the labels were matched."""
        count = len(self.dataset_names)
        mapping = ", ".join(f"{name} -> {index}" for name, index in list(self.model_ids.items())[:_SHOWN])
        mapping += ", ..." if count > _SHOWN else ""
        if self.kind == "same":
            return f"Labels: the dataset's {count} classes are the model's labels, in the same order."
        if self.kind == "renamed":
            return (
                f"Labels: the model's labels had transformers' default names (LABEL_0, ...); it takes the dataset's: "
                f"{_names(self.model_names)}."
            )
        if self.kind == "new-head":
            return f"Labels: a new head for the dataset's {count} classes ({_names(self.dataset_names)}), trained."
        what = "the model's labels in another order" if self.kind == "permuted" else "some of the model's labels"
        return (
            f"Labels: the dataset's classes are {what}: each image trains (and is scored) as the model's id for its "
            f"class name: {mapping}."
        )


def _is_default(names: Sequence[str]) -> bool:
    return all(_DEFAULT_NAME.fullmatch(str(name)) for name in names)


def match_labels(
    dataset_names: Sequence[str], id2label: Mapping[int, str] | None, *, new_head: bool = False
) -> LabelMap:
    """How the dataset's classes `dataset_names` (by label id) meet a model's labels `id2label` (its config's).

    Args:
        dataset_names: the dataset's class names, by label id (`dataset.features["label"].names`).
        id2label: the model's label names by id; `None` or transformers' defaults (`LABEL_0`, ...) for unnamed
            labels.
        new_head: give the model a new head for the dataset's classes, whatever its labels are.

    Raises:
        InputError: when the model's labels are names other than the dataset's classes (both are listed, with
            the option that gives the model a new head).

    Example:
        >>> match_labels(["cat", "dog"], {0: "cat", 1: "dog", 2: "owl"}).kind
        'subset'
        >>> match_labels(["cat", "dog", "owl"], {0: "LABEL_0", 1: "LABEL_1"}).kind  # a new head: another number
        'new-head'
        >>> match_labels(["cat", "dog"], {0: "car", 1: "bus"})
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: The model's labels (car, bus) are not the dataset's classes (cat, dog): ...
    """
    dataset_names = tuple(str(name) for name in dataset_names)
    model_names = tuple(str(id2label[index]) for index in sorted(id2label or {}))
    if new_head or not model_names or (_is_default(model_names) and len(model_names) != len(dataset_names)):
        return LabelMap(dataset_names, dataset_names, "new-head")
    if _is_default(model_names):
        return LabelMap(dataset_names, dataset_names, "renamed")
    ours, theirs = [_key(name) for name in dataset_names], [_key(name) for name in model_names]
    if ours == theirs:
        return LabelMap(dataset_names, model_names, "same")
    if sorted(ours) == sorted(theirs):
        return LabelMap(dataset_names, model_names, "permuted")
    if set(ours) < set(theirs) and len(set(ours)) == len(ours):
        return LabelMap(dataset_names, model_names, "subset")
    raise InputError(
        f"The model's labels ({_names(model_names)}) are not the dataset's classes ({_names(dataset_names)}): "
        f"training would call each class by another's name. Pass {NEW_HEAD_OPTION} to give the model a new head for "
        "the dataset's classes, or use a model trained on them."
    )


def dataset_label_names(dataset: Any) -> list[str] | None:
    """The class names a `datasets.Dataset` carries in its `labels` or `label` column (`None` for other data)."""
    features = getattr(dataset, "features", None) or {}
    for column in ("labels", "label"):
        names = getattr(features.get(column), "names", None)
        if names is not None:
            return list(names)
    return None


def check_label_names(dataset: Any, id2label: Mapping[int, str] | None) -> None:
    """An `InputError` unless the class names `dataset` carries (if any) are the model's labels, in its order; a model
    with transformers' default names (or none) takes any.

    Example:
        >>> import datasets
        >>> data = datasets.Dataset.from_dict({"label": [0, 1]}, features=datasets.Features(
        ...     label=datasets.ClassLabel(names=["circles", "stripes"])))
        >>> check_label_names(data, {0: "stripes", 1: "circles"})
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: The data's classes (circles, stripes) are the model's labels (stripes, ...
    """
    names = dataset_label_names(dataset)
    model_names = [str(id2label[index]) for index in sorted(id2label or {})]
    if names is None or not model_names or _is_default(model_names):
        return
    labels = match_labels(names, id2label)  # raises for other names
    if all(labels.model_ids[name] == index for index, name in enumerate(names)):
        return
    problem = "in another order" if labels.kind == "permuted" else "only some of them, under other ids"
    raise InputError(
        f"The data's classes ({_names(names)}) are the model's labels ({_names(model_names)}) {problem}: its label "
        "ids would train other classes. Align them first: dataset.align_labels_with_mapping(model.config.label2id, "
        '"label").'
    )
