"""`surgical-peft train ...`: fine-tune on (shifted) target data and save the adapter (`surgical_peft.cli.recipe`)."""

from __future__ import annotations

import argparse

from ..recipe import add_training_arguments, print_summary, printed_run_lines, run_training

__all__ = ["COMMAND"]


class Train:
    help = "fine-tune a model on (shifted) target data and save the adapter"
    description = (
        "Fine-tune a model with surgical fine-tuning (or full, linear-probe, LP-FT) on a small labelled\n"
        "target set and save the adapter. Runs on one CPU or, under 'accelerate launch', on several devices.\n"
        "The defaults are the built-in demo: demo-resnet on the target half of the digits, shifted by contrast.\n"
        "With your own --model or --dataset, all of the dataset is the target and nothing is shifted unless\n"
        "--shift asks. The dataset's classes meet the model's labels by name (another order is mapped onto the\n"
        "model's ids; other names need --new-head). The run prints how many images train and evaluate, how the\n"
        "labels were matched and the image size, then one line per epoch; --dry-run stops there, writing nothing.\n"
        "A rerun with the same --output-dir resumes from the last checkpoint; Ctrl-C says how."
    )
    epilog = (
        "examples:\n"
        "  surgical-peft train --block stage1\n"
        "  surgical-peft train --block auto --shift fog\n"
        "  surgical-peft train --model ./my-model --dataset ./my-images --dry-run\n"
        "  surgical-peft train --model microsoft/resnet-50 --dataset ./my-images --new-head --block stage1\n"
        "  accelerate launch -m surgical_peft.cli train --block stage1"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_training_arguments(parser)

    def run(self, args: argparse.Namespace) -> None:
        with printed_run_lines():
            print_summary(run_training(args))


COMMAND = Train()
