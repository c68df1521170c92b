"""`surgical-peft rank MODEL DATA`: rank a model's blocks for fine-tuning on labelled target data."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from ...argparser import add_dataclass_arguments, dataclass_from_options
from ...criteria import CRITERIA
from ...files import write_file
from ...training.arguments import FineTuneArguments
from ..arguments import MODEL_HELP, DataArguments, ModelArguments, RunArguments

if TYPE_CHECKING:
    from ...ranking import BlockRanking

__all__ = ["COMMAND"]


class Rank:
    help = "rank a model's blocks for fine-tuning on target data"
    description = (
        "Rank a model's blocks on labelled target data, before any fine-tuning:\n"
        "  rgn    Auto-RGN: relative gradient norm ||g||/||w|| of the target loss (fast)\n"
        "  snr    Auto-SNR: signal-to-noise ratio of per-example gradients (fast)\n"
        "  sweep  fine-tune each block briefly and score it on held-out data (slow, direct)\n"
        "  greedy grow a block subset by held-out accuracy, one block at a time (slowest; SubTuning)\n"
        "Prints a table of block, score and parameter count; the best block is the one to tune.\n\n"
        "The blocks are ranked on --train-n labelled target images (default: all of them, at most 200), after\n"
        "--shift, with the model's head as it is: the dataset's class names must be its labels, in any order. With\n"
        "your own MODEL or DATA, all of DATA is the target and no shift is applied unless --shift asks. The built-in\n"
        "demo (demo-resnet on digits) splits the digits into a source half, which the demo's small ResNet is\n"
        "pretrained on for the shift (a minute the first time, then cached), and a target half, shifted by contrast\n"
        "at severity 5 by default."
    )
    epilog = (
        "examples:\n"
        "  surgical-peft rank demo-resnet digits --shift contrast\n"
        "  surgical-peft rank demo-resnet digits --shift label-permutation --criterion sweep --plot ranking.png\n"
        "  surgical-peft rank ./my-model ./my-imagefolder --criterion snr --json ranking.json"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)
        parser.add_argument(
            "dataset",
            metavar="DATA",
            help="the data: 'digits' (built in), a Hub dataset id (cached, when offline) or an imagefolder directory",
        )
        parser.add_argument("--criterion", choices=CRITERIA.names, default="rgn", help="how blocks are scored")
        add_dataclass_arguments(parser, DataArguments, exclude=("dataset", "eval_n", "unlabeled_n", "public_dataset"))
        add_dataclass_arguments(parser, ModelArguments, include=("cache_dir",))
        # sweep and greedy fine-tune each candidate briefly: 3 epochs
        sweep = ("epochs", "learning_rate", "batch_size", "seed")
        add_dataclass_arguments(parser, FineTuneArguments, include=sweep, defaults={"epochs": 3})
        parser.add_argument("--num-batches", type=int, default=4, help="batches rgn and snr average over")
        parser.add_argument(
            "--greedy-threshold",
            type=float,
            default=0.0,
            help="greedy: stop when no block improves held-out accuracy by more than this, in [0, 1)",
        )
        parser.add_argument("--plot", metavar="PNG", help="save a bar chart of the scores here")
        parser.add_argument("--json", metavar="PATH", help="save the scores as JSON here")

    def run(self, args: argparse.Namespace) -> None:
        import torch
        from torch.utils.data import DataLoader

        from ...selection import rank_blocks
        from ..target import load_target

        # Checked first (epochs, learning rate, batch size, seed), before any data or model is loaded.
        sweep = dataclass_from_options(FineTuneArguments, args)
        run = RunArguments(
            model=dataclass_from_options(ModelArguments, args),
            data=dataclass_from_options(DataArguments, args, eval_n=0),  # no evaluation split: it only ranks
            fine_tune=sweep,
        )
        target = load_target(run, use="ranking", keep_head=True)
        print(target.describe(), flush=True)
        loader = DataLoader(
            target.train,
            batch_size=sweep.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(sweep.seed),
        )
        ranking = rank_blocks(
            target.model.model,
            loader,
            args.criterion,
            num_batches=args.num_batches,
            sweep_args=sweep,
            seed=sweep.seed,
            greedy_threshold=args.greedy_threshold,
        )
        _report(ranking, args)


def _report(ranking: BlockRanking, args: argparse.Namespace) -> None:
    """Print the ranking and its choice; write the plot and the JSON where asked."""
    print(ranking)
    if ranking.chosen:
        print(f"chosen blocks: {', '.join(ranking.chosen)}")
    elif ranking.degenerate:
        print(f"best block: none singled out ({ranking.degenerate})")
    else:
        print(f"best block: {ranking.best(1)[0]}")
    if args.plot:
        print(f"plot: {ranking.plot(args.plot)}")
    if args.json:
        write_file(args.json, json.dumps(ranking.to_dict(), indent=1))
        print(f"scores: {args.json}")


COMMAND = Rank()
