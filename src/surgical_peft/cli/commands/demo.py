"""`surgical-peft demo`: the paper's headline experiment at small scale, offline (`surgical_peft.experiments.demo`)."""

from __future__ import annotations

import argparse

from ..options import add_cache_dir_option, add_target_options

__all__ = ["COMMAND"]


class Demo:
    help = "the paper's headline experiment in a few minutes, offline"
    description = (
        "Pretrain a small ResNet on clean digits, shift the target (default: contrast at severity 5), fine-tune\n"
        "each block and the whole model on a few labelled target images, and print the target accuracy per block."
    )
    epilog = "examples:\n  surgical-peft demo\n  surgical-peft demo --shift label-permutation --repeats 1"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_target_options(parser, train_n=150)
        parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
        parser.add_argument("--repeats", type=int, default=3, help="seeds per row")
        add_cache_dir_option(parser)
        parser.add_argument("--output-dir", default="outputs/demo", help="where demo.png and results.json go")

    def run(self, args: argparse.Namespace) -> None:
        from ...experiments.demo import demo

        demo(
            shift=args.shift,
            severity=args.severity,
            train_n=args.train_n,
            epochs=args.epochs,
            repeats=args.repeats,
            seed=args.seed,
            cache_dir=args.cache_dir,
            output_dir=args.output_dir,
        )


COMMAND = Demo()
