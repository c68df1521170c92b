"""The command line's copies of choices and defaults (`surgical_peft.cli.defaults`, kept light for `--help`) equal the
values of the modules that own them, and the descriptions its help reads from the members' source equal theirs."""

from __future__ import annotations

import pytest

from surgical_peft.cli import defaults
from surgical_peft.criteria import CRITERIA
from surgical_peft.experiments import data, demo, shifts
from surgical_peft.privacy import PrivacyArguments
from surgical_peft.registry import Registry
from surgical_peft.training import FineTuneArguments, arguments
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
        ("LR_MODES", arguments.LR_MODES),
        ("MIXED_PRECISION", arguments.MIXED_PRECISION),
        ("DELTA_DTYPES", config.DELTA_DTYPES),
    ],
)
def test_a_copied_constant_equals_its_original(copy: str, original: object) -> None:
    assert getattr(defaults, copy) == original


def _same(copied: dict[str, object], original: object) -> None:
    """Equal values of the same types (the help prints `10` and `10.0` differently)."""
    expected = {name: getattr(original, name) for name in copied}
    assert copied == expected
    assert {name: type(value) for name, value in copied.items()} == {k: type(v) for k, v in expected.items()}


def test_the_training_defaults_equal_fine_tune_arguments() -> None:
    copied = vars(defaults.TRAINING)
    _same({**copied, "blocks": list(copied["blocks"])}, FineTuneArguments())  # a tuple here: it is shared


def test_the_privacy_defaults_equal_privacy_arguments() -> None:
    _same(vars(defaults.PRIVACY), PrivacyArguments(epsilon=1.0))


@pytest.mark.parametrize(
    ("registry", "name"), [*((STRATEGIES, n) for n in STRATEGIES.names), *((CRITERIA, n) for n in CRITERIA.names)]
)
def test_a_description_is_read_from_its_source(registry: Registry, name: str) -> None:
    """What the help shows (`Registry.literal`) is the member's own description (strategies: a class attribute,
    criteria: a keyword argument)."""
    assert registry.literal(name, "description") == registry.get(name).description
