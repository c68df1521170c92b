"""Options made from dataclass fields (`surgical_peft.argparser`), as `HfArgumentParser` makes them: the options of
`train` and `rank` keep every name they had, and parse back into the same settings."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from surgical_peft.argparser import add_dataclass_arguments, dataclass_from_options, option_values
from surgical_peft.cli import build_parser
from surgical_peft.cli.recipe import add_training_arguments, run_arguments

# What the hand-written parsers had (before the options were made from the dataclasses).
TRAIN_OPTIONS = [
    "--model",
    "--dataset",
    "--split",
    "--image-column",
    "--label-column",
    "--skip-unreadable-images",
    "--shift",
    "--severity",
    "--train-n",
    "--seed",
    "--eval-n",
    "--cache-dir",
    "--block",
    "--strategy",
    "--epochs",
    "--lp-epochs",
    "--lr",
    "--lr-mode",
    "--lr-decay",
    "--weight-decay",
    "--batch-size",
    "--gradient-accumulation-steps",
    "--mixed-precision",
    "--delta-dtype",
    "--cache-features",
    "--switch-every",
    "--unlabeled-n",
    "--pseudo-label-threshold",
    "--self-train-rounds",
    "--ensemble-size",
    "--epsilon",
    "--delta",
    "--feature-norm",
    "--pca-dim",
    "--public-dataset",
    "--dp-steps",
    "--dp-lr",
    "--clipping-norm",
    "--output-dir",
    "--push-to-hub",
    "--hub-model-id",
    "--no-progress",
]
RANK_OPTIONS = [
    "--criterion",
    "--split",
    "--image-column",
    "--label-column",
    "--skip-unreadable-images",
    "--shift",
    "--severity",
    "--train-n",
    "--seed",
    "--cache-dir",
    "--num-batches",
    "--batch-size",
    "--image-size",
    "--epochs",
    "--learning-rate",
    "--greedy-threshold",
    "--plot",
    "--json",
]


def option_strings(command: str) -> set[str]:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {option for action in subparsers.choices[command]._actions for option in action.option_strings}


@pytest.mark.parametrize(("command", "options"), [("train", TRAIN_OPTIONS), ("rank", RANK_OPTIONS)])
def test_every_option_keeps_its_name(command: str, options: list[str]) -> None:
    assert set(options) <= option_strings(command)


@dataclass
class Settings:
    _argument_group_name = "settings"

    name: str = field(metadata={"help": "required: no default"})
    mode: Literal["fast", "slow"] = field(default="fast", metadata={"help": "choices from the Literal"})
    size: int | None = field(default=None, metadata={"help": "an int or nothing"})
    blocks: list[str] = field(default_factory=lambda: ["head"], metadata={"help": "repeatable", "action": "append",
                                                                          "option": "--block"})  # fmt: skip
    verbose: bool = field(default=False, metadata={"help": "a flag"})
    progress: bool = field(default=True, metadata={"help": "a --no- flag"})
    hidden: object = None  # no help: no option


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Settings)
    return parser


def test_types_defaults_flags_and_choices_as_hf_argument_parser_makes_them() -> None:
    settings = dataclass_from_options(Settings, parser().parse_args(["--name", "x"]))
    assert settings == Settings(name="x")
    argv = [
        "--name",
        "x",
        "--mode",
        "slow",
        "--size",
        "3",
        "--block",
        "a",
        "--block",
        "b",
        "--verbose",
        "--no-progress",
    ]
    assert dataclass_from_options(Settings, parser().parse_args(argv)) == Settings(
        name="x", mode="slow", size=3, blocks=["a", "b"], verbose=True, progress=False
    )
    assert option_values(Settings(name="x")) == {
        "name": "x", "mode": "fast", "size": None, "block": ["head"], "verbose": False, "progress": True
    }  # fmt: skip
    for bad in (["--mode", "slow"], ["--name", "x", "--mode", "medium"], ["--name", "x", "--size", "big"]):
        with pytest.raises(SystemExit):
            parser().parse_args(bad)
    assert [group.title for group in parser()._action_groups][-1] == "settings"


def test_the_training_options_parse_into_the_run_they_name() -> None:
    argv = ["--model", "./m", "--dataset", "./d", "--lr", "0.01", "--block", "stage1", "--strategy", "lp-ft",
            "--image-size", "64", "--new-head", "--no-progress", "--epochs", "3"]  # fmt: skip
    run = run_arguments(add_training_arguments(argparse.ArgumentParser()).parse_args(argv))
    assert (run.model.model, run.model.new_head, run.data.dataset, run.data.image_size) == ("./m", True, "./d", 64)
    assert (run.fine_tune.learning_rate, run.fine_tune.blocks, run.fine_tune.strategy) == (0.01, ["stage1"], "lp-ft")
    assert (run.fine_tune.progress, run.fine_tune.privacy, run.data.shift, run.dry_run) == (False, None, "none", False)
    assert "epochs" not in run.identity() and run.identity()["lr"] == 0.01
