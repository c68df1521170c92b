"""The `surgical-peft` command line: list a model's blocks, rank them on target data, train, run the demo.

    surgical-peft blocks MODEL
    surgical-peft rank MODEL DATA [--criterion rgn|snr|sweep] [--shift SHIFT] [--plot ranking.png]
    surgical-peft train ...
    surgical-peft demo

`surgical-peft COMMAND --help` describes each command. Bad input prints a message (no traceback) and exits with
status 2.

Example:
    >>> from surgical_peft.cli import main
    >>> main(["blocks", "demo-resnet"])  # doctest: +ELLIPSIS
    ResNetForImageClassification: 6 blocks, 310.7K parameters
      block       params   share  modules
      embedder      2.4K    0.8%  resnet.embedder
    ...
      head          1.3K    0.4%  classifier
    0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["BUILT_IN_MODELS", "build_parser", "main"]

BUILT_IN_MODELS = ("demo-resnet",)
"""Model names that need no download: `demo-resnet` is the demo's small ResNet for 32x32 digits (`rank` uses it
pretrained on the source half of the digits, which takes a minute the first time and is cached)."""

_DESCRIPTION = """\
Surgical fine-tuning (Lee et al., ICLR 2023) as a PEFT method: fine-tune one block of a pretrained model on a small
labelled target set and freeze the rest. Which block depends on the distribution shift: the first block for
input-level shifts (corruptions), a middle one for feature-level shifts, the last layer for output-level shifts."""

_EPILOG = """\
examples:
  surgical-peft blocks microsoft/resnet-18
  surgical-peft rank demo-resnet digits --shift contrast --plot ranking.png
  surgical-peft train --help
  surgical-peft demo

Run 'surgical-peft COMMAND --help' for the options of a command."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of descriptions and epilogs, and shows the defaults that are set."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        takes_value = action.nargs != 0  # flags such as --no-progress have a default but take no value
        shown = "default" in help_text  # the help already says it, e.g. "%(default)s" or "'digits' (default)"
        unset = action.default is None or action.default is argparse.SUPPRESS  # (0 is a default to show)
        if takes_value and not shown and not unset:
            help_text += " (default: %(default)s)"
        return help_text


class CommandError(Exception):
    """A problem with the command's input, reported as a message and exit status 2."""


_MODEL_HELP = (
    "a Hub model id (read from the local cache when offline), a local directory saved with save_pretrained, "
    f"or a built-in model: {', '.join(BUILT_IN_MODELS)}"
)


# ------------------------------------------------------------------------------------------------------ loading
def _load_model(name: str, *, shift: str = "none", seed: int = 0, pretrained: bool = True) -> tuple[nn.Module, Any]:
    """The model and its image processor (`None` when it ships none).

    `demo-resnet` is the demo's source model for `shift` and `seed` when `pretrained`, else its architecture only.
    """
    from transformers import AutoModelForImageClassification, ResNetForImageClassification

    from . import demo
    from .data import load_image_processor

    if name == "demo-resnet":
        if not pretrained:
            return ResNetForImageClassification(demo.source_config()), None
        return ResNetForImageClassification.from_pretrained(demo.source_model(shift, seed=seed)), None
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise CommandError(f"No model directory {name!r}.")
    try:
        model = AutoModelForImageClassification.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise CommandError(
            f"Cannot load model {name!r}: {error} Give a Hub id (cached, when offline), a local directory saved "
            f"with save_pretrained, or one of the built-in models: {', '.join(BUILT_IN_MODELS)}."
        ) from error
    return model, load_image_processor(name)


# ----------------------------------------------------------------------------------------------------- commands
def _blocks(args: argparse.Namespace) -> None:
    from .blocks import list_blocks

    model, _ = _load_model(args.model, pretrained=False)
    print(list_blocks(model))


def _rank(args: argparse.Namespace) -> None:
    from torch.utils.data import DataLoader

    from .data import load_image_dataset, make_target, preprocess
    from .selection import rank_blocks
    from .training import FineTuneArguments

    dataset = load_image_dataset(args.data)
    target = make_target(dataset, args.shift, train_n=args.train_n, severity=args.severity, seed=args.seed)["train"]
    model, processor = _load_model(args.model, shift=args.shift, seed=args.seed)
    num_classes = dataset.features["label"].num_classes
    if num_classes > model.config.num_labels:
        raise CommandError(
            f"{args.data!r} has {num_classes} classes but the model's head predicts {model.config.num_labels}: use "
            "a model fine-tuned for this label set (e.g. one saved by 'surgical-peft train')."
        )
    image_size = args.image_size or getattr(model.config, "image_size", None) or 224
    examples = preprocess(target, processor, image_size=image_size)
    loader = DataLoader(
        examples, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(args.seed)
    )
    sweep_args = FineTuneArguments(epochs=args.epochs, learning_rate=args.learning_rate, batch_size=args.batch_size)
    ranking = rank_blocks(
        model, loader, args.criterion, num_batches=args.num_batches, sweep_args=sweep_args, seed=args.seed
    )
    print(ranking)
    print(f"best block: {ranking.best(1)[0]}")
    if args.plot:
        print(f"plot: {ranking.plot(args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(ranking.to_dict(), indent=1))
        print(f"scores: {args.json}")


def _train(args: argparse.Namespace) -> None:
    from .recipe import run_training

    run_training(args)


def _demo(args: argparse.Namespace) -> None:
    from .demo import main

    main(args.options)


# ------------------------------------------------------------------------------------------------------- parser
def _add_blocks(commands: Any) -> None:
    parser = commands.add_parser(
        "blocks",
        help="list a model's blocks with their parameter counts",
        description="List the blocks surgical fine-tuning can tune, in forward order, with their parameter counts\n"
        "and the modules they hold. The names are what SurgicalConfig(block=...) and 'train --block' take.",
        epilog="examples:\n  surgical-peft blocks microsoft/resnet-18\n  surgical-peft blocks ./my-model\n"
        "  surgical-peft blocks demo-resnet",
        formatter_class=_Formatter,
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.set_defaults(handler=_blocks)


def _add_rank(commands: Any) -> None:
    from .data import SHIFTS
    from .selection import CRITERIA

    parser = commands.add_parser(
        "rank",
        help="rank a model's blocks for fine-tuning on target data",
        description="Rank a model's blocks on labelled target data, before any fine-tuning:\n"
        "  rgn    Auto-RGN: relative gradient norm ||g||/||w|| of the target loss (fast)\n"
        "  snr    Auto-SNR: signal-to-noise ratio of per-example gradients (fast)\n"
        "  sweep  fine-tune each block briefly and score it on held-out data (slow, direct)\n"
        "Prints a table of block, score and parameter count; the best block is the one to tune.\n\n"
        "DATA is split into a source and a target half (see surgical_peft.data.make_target); the blocks are ranked "
        "on\n--train-n labelled images of the target half, after --shift. With MODEL demo-resnet, the model is the "
        "demo's\nsmall ResNet pretrained on the source half for that shift (a minute the first time, then cached).",
        epilog="examples:\n"
        "  surgical-peft rank demo-resnet digits --shift contrast\n"
        "  surgical-peft rank demo-resnet digits --shift label-permutation --criterion sweep --plot ranking.png\n"
        "  surgical-peft rank ./my-model ./my-imagefolder --shift none --criterion snr --json ranking.json",
        formatter_class=_Formatter,
    )
    parser.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    parser.add_argument(
        "data",
        metavar="DATA",
        help="the data: 'digits' (built in), a Hub dataset id (cached, when offline) or an imagefolder directory",
    )
    parser.add_argument("--criterion", choices=CRITERIA, default="rgn", help="how blocks are scored")
    parser.add_argument(
        "--shift", default="contrast", choices=SHIFTS, metavar="SHIFT", help=f"target shift: {', '.join(SHIFTS)}"
    )
    parser.add_argument("--severity", type=int, choices=range(1, 6), default=5, help="corruption severity, 1-5")
    parser.add_argument("--train-n", type=int, default=200, help="labelled target images to rank on")
    parser.add_argument("--num-batches", type=int, default=4, help="batches rgn and snr average over")
    parser.add_argument("--batch-size", type=int, default=32, help="examples per batch")
    parser.add_argument("--image-size", type=int, help="image side in pixels (default: the model's)")
    parser.add_argument("--epochs", type=int, default=3, help="sweep: epochs of fine-tuning per block")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="sweep: learning rate")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shift, the subset and the batches")
    parser.add_argument("--plot", metavar="PNG", help="save a bar chart of the scores here")
    parser.add_argument("--json", metavar="PATH", help="save the scores as JSON here")
    parser.set_defaults(handler=_rank)


def _add_train(commands: Any) -> None:
    from .recipe import add_training_arguments

    parser = commands.add_parser(
        "train",
        help="fine-tune a model on (shifted) target data and save the adapter",
        description="Fine-tune a model with surgical fine-tuning (or full, linear-probe, LP-FT) on a small labelled\n"
        "target set and save the adapter. Runs on one CPU or, under 'accelerate launch', on several devices.",
        epilog="examples:\n"
        "  surgical-peft train --block stage1\n"
        "  surgical-peft train --block auto --shift fog\n"
        "  accelerate launch -m surgical_peft.cli train --block stage1",
        formatter_class=_Formatter,
    )
    add_training_arguments(parser)
    parser.set_defaults(handler=_train)


def _add_demo(commands: Any) -> None:
    # The demo parses its own options (see `main`): `surgical-peft demo --help` prints them.
    parser = commands.add_parser(
        "demo", help="the paper's headline experiment in a few minutes, offline (options: demo --help)", add_help=False
    )
    parser.set_defaults(handler=_demo)


def build_parser() -> argparse.ArgumentParser:
    """The `surgical-peft` argument parser.

    Example:
        >>> build_parser().parse_args(["rank", "demo-resnet", "digits", "--criterion", "snr"]).criterion
        'snr'
    """
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="surgical-peft", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=_Formatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for add in (_add_blocks, _add_rank, _add_train, _add_demo):
        add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (2 on bad input, with a message on stderr).

    Example:
        >>> main(["blocks", "./no-such-model"])
        2
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handler: Callable[[argparse.Namespace], None] = args.handler
    if handler is _demo:
        args.options = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        handler(args)
    except (CommandError, ValueError, OSError, ImportError) as error:
        print(f"surgical-peft {args.handler.__name__.strip('_')}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
