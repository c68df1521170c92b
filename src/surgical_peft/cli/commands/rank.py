"""`surgical-peft rank MODEL DATA`: rank a model's blocks for fine-tuning on labelled target data."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ...criteria import CRITERIA
from ...errors import InputError
from ..options import MODEL_HELP, add_cache_dir_option, add_dataset_options, add_target_options, whole_number

if TYPE_CHECKING:
    from ...ranking import BlockRanking

__all__ = ["COMMAND"]

_MAX_IMAGE_SIZE = 8192  # pixels a side: larger overflows the resize


class Rank:
    help = "rank a model's blocks for fine-tuning on target data"
    description = (
        "Rank a model's blocks on labelled target data, before any fine-tuning:\n"
        "  rgn    Auto-RGN: relative gradient norm ||g||/||w|| of the target loss (fast)\n"
        "  snr    Auto-SNR: signal-to-noise ratio of per-example gradients (fast)\n"
        "  sweep  fine-tune each block briefly and score it on held-out data (slow, direct)\n"
        "  greedy grow a block subset by held-out accuracy, one block at a time (slowest; SubTuning)\n"
        "Prints a table of block, score and parameter count; the best block is the one to tune.\n\n"
        "The blocks are ranked on --train-n labelled target images, after --shift. With your own MODEL or DATA,\n"
        "all of DATA is the target and no shift is applied unless --shift asks. The built-in demo (demo-resnet on\n"
        "digits) splits the digits into a source half, which the demo's small ResNet is pretrained on for the shift\n"
        "(a minute the first time, then cached), and a target half, shifted by contrast at severity 5 by default."
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
        add_dataset_options(parser)
        add_target_options(parser, train_n=200, shift=None, severity=None)
        add_cache_dir_option(parser)
        parser.add_argument("--num-batches", type=int, default=4, help="batches rgn and snr average over")
        parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
        parser.add_argument(
            "--image-size", type=whole_number(1, _MAX_IMAGE_SIZE), help="image side in pixels (default: the model's)"
        )
        parser.add_argument("--epochs", type=int, default=3, help="sweep, greedy: epochs of fine-tuning per candidate")
        parser.add_argument("--learning-rate", type=float, default=1e-3, help="sweep, greedy: learning rate")
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
        from ...training import FineTuneArguments
        from ..models import load_model
        from ..target import load_target

        # Checked first (epochs, learning rate, batch size, seed), before any data or model is loaded.
        sweep = FineTuneArguments(
            epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size, seed=args.seed
        )
        target = load_target(args, eval_n=0, use="ranking")
        print(target.message, flush=True)
        loaded = load_model(args.model, shift=args.shift, seed=args.seed, cache_dir=args.cache_dir)
        num_classes, num_labels = len(target.label_names), loaded.model.config.num_labels
        if num_classes > num_labels:
            raise InputError(
                f"{args.dataset!r} has {num_classes} classes but the model's head predicts {num_labels}: use a model "
                "fine-tuned for this label set (e.g. one saved by 'surgical-peft train')."
            )
        loader = DataLoader(
            loaded.preprocess(target.train, image_size=args.image_size),
            batch_size=args.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(args.seed),
        )
        ranking = rank_blocks(
            loaded.model,
            loader,
            args.criterion,
            num_batches=args.num_batches,
            sweep_args=sweep,
            seed=args.seed,
            greedy_threshold=args.greedy_threshold,
        )
        _report(ranking, args)


def _report(ranking: BlockRanking, args: argparse.Namespace) -> None:
    """Print the ranking and its choice; write the plot and the JSON where asked."""
    print(ranking)
    if ranking.chosen:
        print(f"chosen blocks: {', '.join(ranking.chosen)}")
    else:
        print(f"best block: {ranking.best(1)[0]}")
    if args.plot:
        print(f"plot: {ranking.plot(args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(ranking.to_dict(), indent=1))
        print(f"scores: {args.json}")


COMMAND = Rank()
