"""The command line's copies of choices and defaults (`surgical_peft.cli.defaults`, and `DELTA_DTYPES` in the light
`training.arguments`, kept light for `--help`) equal the values of the modules that own them, and the descriptions its
help reads from the members' source equal theirs. (The training and privacy options' defaults are the dataclasses'
own fields: `surgical_peft.argparser` makes the options from them.)"""

from __future__ import annotations

import pytest

from surgical_peft.cli import defaults
from surgical_peft.criteria import CRITERIA
from surgical_peft.experiments import data, demo, shifts
from surgical_peft.registry import Registry
from surgical_peft.training import arguments
from surgical_peft.training.strategies import STRATEGIES
from surgical_peft.tuner import config


@pytest.mark.parametrize(
    ("copy", "original"),
    [
        ("SOURCE_MODEL", demo.SOURCE_MODEL),
        ("DEFAULT_SHIFT", demo.DEFAULT_SHIFT),
        ("DIGITS", data.DIGITS),
        ("SHIFTS", data.SHIFTS),
        ("SEVERITIES", shifts.SEVERITIES),
        ("CORRUPTIONS", shifts.CORRUPTIONS),
    ],
)
def test_a_copied_constant_equals_its_original(copy: str, original: object) -> None:
    assert getattr(defaults, copy) == original


def test_the_delta_dtypes_copy_equals_the_tuners() -> None:
    assert arguments.DELTA_DTYPES == config.DELTA_DTYPES


@pytest.mark.parametrize(
    ("registry", "name"), [*((STRATEGIES, n) for n in STRATEGIES.names), *((CRITERIA, n) for n in CRITERIA.names)]
)
def test_a_description_is_read_from_its_source(registry: Registry, name: str) -> None:
    """What the help shows (`Registry.literal`) is the member's own description (strategies: a class attribute,
    criteria: a keyword argument)."""
    assert registry.literal(name, "description") == registry.get(name).description
