"""`surgical-peft demo`: the paper's headline experiment at small scale, offline (`surgical_peft.experiments.demo`)."""

from __future__ import annotations

import argparse

from ..defaults import DEFAULT_SHIFT, SEVERITIES, SHIFTS, SOURCE_MODEL

__all__ = ["COMMAND"]


class Demo:
    help = "the paper's headline experiment in a few minutes, offline"
    description = (
        "Pretrain a small ResNet on clean digits, shift the target (default: contrast at severity 5), fine-tune\n"
        "each block and the whole model on a few labelled target images, and print the target accuracy per block."
    )
    epilog = "examples:\n  surgical-peft demo\n  surgical-peft demo --shift label-permutation --repeats 1"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        shifts = f"target shift: {', '.join(SHIFTS)}"
        parser.add_argument("--shift", choices=SHIFTS, default=DEFAULT_SHIFT, metavar="SHIFT", help=shifts)
        severities = "corruption severity, 1-5"
        parser.add_argument("--severity", type=int, choices=SEVERITIES, default=SEVERITIES[-1], help=severities)
        parser.add_argument("--train-n", type=int, default=150, help="labelled target training images")
        parser.add_argument("--seed", type=int, default=0, help="seed of the data splits, the shift and the training")
        parser.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs")
        parser.add_argument("--repeats", type=int, default=3, help="seeds per row")
        parser.add_argument(
            "--cache-dir",
            help=f"cache of the pretrained {SOURCE_MODEL} (default: $SURGICAL_PEFT_CACHE or ~/.cache/surgical_peft)",
        )
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
