"""`surgical-peft train ...`: fine-tune on (shifted) target data and save the adapter (`surgical_peft.cli.recipe`)."""

from __future__ import annotations

import argparse

from ..recipe import add_training_arguments, print_summary, run_training

__all__ = ["COMMAND"]


class Train:
    help = "fine-tune a model on (shifted) target data and save the adapter"
    description = (
        "Fine-tune a model with surgical fine-tuning (or full, linear-probe, LP-FT) on a small labelled\n"
        "target set and save the adapter. Runs on one CPU or, under 'accelerate launch', on several devices."
    )
    epilog = (
        "examples:\n"
        "  surgical-peft train --block stage1\n"
        "  surgical-peft train --block auto --shift fog\n"
        "  accelerate launch -m surgical_peft.cli train --block stage1"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_training_arguments(parser)

    def run(self, args: argparse.Namespace) -> None:
        print_summary(run_training(args))


COMMAND = Train()
