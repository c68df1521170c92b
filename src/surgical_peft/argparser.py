"""Command-line options made from dataclass fields, as transformers' `HfArgumentParser` makes them, in a light module.

A run is described once, by dataclasses (`FineTuneArguments`, `PrivacyArguments`, the command line's
`ModelArguments` and `DataArguments`); `add_dataclass_arguments` adds an option for each field whose metadata has a
`help`, and `dataclass_from_options` builds the dataclass back from the parsed options. So the command line,
`examples/train.py`, `--dry-run` and Python code share one description of a run.

`transformers.HfArgumentParser` itself is not used: importing it imports `transformers` (0.7 s here, with numpy, PIL
and huggingface_hub), which `surgical-peft COMMAND --help` must not pay (`tests/test_layout.py`). What it does, this
module does the same way:

- the option is `--field-name` (`--field_name` is not added); a `bool` field that defaults to `False` is a flag
  (`store_true`), one that defaults to `True` is `--no-field-name` (`store_false`);
- `X | None` is an option of type `X` that defaults to `None`; `Literal[...]` gives the choices; `list[X]` takes
  several values (`nargs="+"`);
- the field's default is the option's; a field without a default is a required option;
- the metadata's other keys go to `argparse.add_argument` as they are (`type`, `choices`, `metavar`, `action`,
  `required`, ...), `aliases` adds option strings.

Three keys of its own: `option` names the option where it is not `--field-name` (`--lr` for `learning_rate`),
`group` puts it in another help section than the dataclass's (`_argument_group_name`, as in transformers), and a
field without `help` is no option (a dataset object, say).

Example:
    >>> import argparse
    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Settings:
    ...     epochs: int = field(default=3, metadata={"help": "passes over the data"})
    ...     learning_rate: float = field(default=0.1, metadata={"help": "step size", "option": "--lr"})
    ...     progress: bool = field(default=True, metadata={"help": "hide progress bars"})
    >>> parser = argparse.ArgumentParser()
    >>> add_dataclass_arguments(parser, Settings)
    >>> dataclass_from_options(Settings, parser.parse_args(["--lr", "0.5", "--no-progress"]))
    Settings(epochs=3, learning_rate=0.5, progress=False)
    >>> option_values(Settings(epochs=5))
    {'epochs': 5, 'lr': 0.1, 'progress': True}
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Collection, Iterable
from typing import Any, Literal, Union

__all__ = [
    "HelpFormatter",
    "add_dataclass_arguments",
    "dataclass_from_options",
    "option_fields",
    "option_values",
    "whole_number",
]

_OWN_KEYS = ("help", "option", "group", "aliases")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs, and shows the defaults that are set (as
    `argparse.ArgumentDefaultsHelpFormatter` does, but not `None`, and not where the help names the default itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        takes_value = action.nargs != 0  # flags such as --no-progress have a default but take no value
        shown = "default" in help_text  # the help already says it, e.g. "%(default)s" or "'digits' (default)"
        unset = action.default is None or action.default is argparse.SUPPRESS  # (0 is a default to show)
        if takes_value and not shown and not unset:
            help_text += " (default: %(default)s)"
        return help_text


def whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An `argparse` type: a whole number of at least `low` (and at most `high`), or a message saying so.

    Example:
        >>> whole_number(1)("3"), whole_number(1, 10)("10")
        (3, 10)
    """
    bounds = f"of at least {low}" if high is None else f"from {low} to {high}"

    def parse(value: str) -> int:
        number = int(value) if value.strip().lstrip("+-").isdigit() else None
        if number is None or number < low or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {bounds}, got {value!r}")
        return number

    return parse


def option_fields(dataclass_type: type) -> list[dataclasses.Field]:
    """The fields of `dataclass_type` that are command-line options (those whose metadata has a `help`)."""
    return [field for field in dataclasses.fields(dataclass_type) if "help" in field.metadata]


def _option(field: dataclasses.Field) -> str:
    """The option's name: `--name` from the metadata's `option`, else the field's name with dashes."""
    if "option" in field.metadata:
        return field.metadata["option"]
    prefix = "--no-" if field.default is True else "--"
    return prefix + field.name.replace("_", "-")


def _annotation(dataclass_type: type, field: dataclasses.Field) -> Any:
    """The field's type; a string annotation (`from __future__ import annotations`) is evaluated in the dataclass's
    module, for the option fields only (the others may name types imported for type checkers alone)."""
    if not isinstance(field.type, str):
        return field.type
    return eval(field.type, vars(sys.modules[dataclass_type.__module__]))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _argparse_keywords(dataclass_type: type, field: dataclasses.Field) -> dict[str, Any]:
    """`add_argument`'s keywords for `field`, from its type and default, then its metadata."""
    annotation = _annotation(dataclass_type, field)
    if typing.get_origin(annotation) in (Union, types.UnionType):  # `X | None`
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    default = _default(field)
    keywords: dict[str, Any] = {"dest": field.name, "help": field.metadata["help"]}
    if annotation is bool:
        keywords["action"] = "store_false" if default is True else "store_true"
    elif typing.get_origin(annotation) is Literal:
        keywords["choices"] = list(typing.get_args(annotation))
        keywords["type"] = type(keywords["choices"][0])
    elif typing.get_origin(annotation) is list:
        keywords.update(nargs="+", type=typing.get_args(annotation)[0])
    else:
        keywords["type"] = annotation
    if "option" in field.metadata and annotation is not bool:  # `--lr LR`, not `--lr LEARNING_RATE`
        keywords["metavar"] = field.metadata["option"].removeprefix("--").replace("-", "_").upper()
    if default is dataclasses.MISSING:
        keywords["required"] = True
    else:
        keywords["default"] = default
    keywords.update({key: value for key, value in field.metadata.items() if key not in _OWN_KEYS})
    if keywords.get("action") == "append":  # argparse would append to a default list: the dataclass fills it in
        keywords.update(default=None, type=keywords.get("type", str))
        keywords.pop("nargs", None)
    return keywords


def _group(parser: argparse.ArgumentParser, title: str | None) -> Any:
    """The section of `parser`'s help titled `title` (made once), or `parser` itself for none."""
    if title is None:
        return parser
    found = next((group for group in parser._action_groups if group.title == title), None)
    return found or parser.add_argument_group(title)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    dataclass_type: type,
    *,
    include: Collection[str] | None = None,
    exclude: Collection[str] = (),
    defaults: dict[str, Any] | None = None,
) -> None:
    """Add an option to `parser` for each field of `dataclass_type` that has a `help` (see the module's docstring).

    Args:
        include: the fields to add (default: every option field).
        exclude: fields not to add (e.g. one the caller makes a positional argument).
        defaults: other defaults than the dataclass's, by field name (e.g. fewer epochs for a quick sweep).

    Example:
        >>> from surgical_peft.training import FineTuneArguments
        >>> parser = argparse.ArgumentParser()
        >>> add_dataclass_arguments(parser, FineTuneArguments, include=["epochs", "seed"], defaults={"epochs": 3})
        >>> parser.parse_args([])
        Namespace(epochs=3, seed=0)
    """
    section = getattr(dataclass_type, "_argument_group_name", None)
    for field in option_fields(dataclass_type):
        if (include is not None and field.name not in include) or field.name in exclude:
            continue
        keywords = _argparse_keywords(dataclass_type, field)
        if defaults and field.name in defaults:
            keywords["default"] = defaults[field.name]
        group = _group(parser, field.metadata.get("group", section))
        group.add_argument(_option(field), *field.metadata.get("aliases", ()), **keywords)


def dataclass_from_options(dataclass_type: type, options: argparse.Namespace | dict[str, Any], **values: Any) -> Any:
    """`dataclass_type` built from parsed `options` (a namespace or a dict, by field name) and `values` (fields that
    are no options, or set otherwise); an option left at `None` whose field has another default takes that default
    (e.g. `--block` not given: the dataclass's blocks).

    Raises:
        InputError: (from the dataclass's checks) for values it refuses.
    """
    given = vars(options) if isinstance(options, argparse.Namespace) else options
    for field in option_fields(dataclass_type):
        if field.name in values or field.name not in given:
            continue
        value = given[field.name]
        if value is None and _default(field) not in (None, dataclasses.MISSING):
            continue
        values[field.name] = value
    return dataclass_type(**values)


def option_values(instance: Any, fields: Iterable[str] | None = None) -> dict[str, Any]:
    """The option fields of a dataclass instance (only `fields`, if given), named as on the command line: `--lr` is
    `lr`, `--no-progress` is `progress`, `--train-n` is `train_n`.

    Example:
        >>> from surgical_peft.training import FineTuneArguments
        >>> option_values(FineTuneArguments(blocks=["stage1"]), ["blocks", "learning_rate", "progress"])
        {'block': ['stage1'], 'lr': 0.001, 'progress': True}
    """
    return {
        _option(field).removeprefix("--").removeprefix("no-").replace("-", "_"): getattr(instance, field.name)
        for field in option_fields(type(instance))
        if fields is None or field.name in fields
    }
