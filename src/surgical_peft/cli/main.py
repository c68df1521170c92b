"""The `surgical-peft` command line: list a model's blocks, rank them on target data, train, predict, run the demo.

    surgical-peft blocks MODEL
    surgical-peft rank MODEL DATA [--criterion rgn|snr|sweep] [--shift SHIFT] [--plot ranking.png]
    surgical-peft train ...
    surgical-peft predict --model MODEL --adapter ADAPTER [--adapter ADAPTER ...] DATA --output predictions.csv
    surgical-peft demo

`surgical-peft COMMAND --help` describes each command (`surgical_peft.cli.commands`). Bad input prints a message (no
traceback) and exits with status 2; Ctrl-C ends a run with one line naming where it can resume, and status 130.

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
import sys
from collections.abc import Sequence

from .. import __version__
from ..argparser import HelpFormatter
from ..errors import Interrupted, SurgicalPeftError
from .commands import COMMANDS

__all__ = ["build_parser", "main"]

_INTERRUPTED = 130  # the shell's status for a process ended by SIGINT (128 + 2)

_DESCRIPTION = """\
Surgical fine-tuning (Lee et al., ICLR 2023) as a PEFT method: fine-tune one block of a pretrained model on a small
labelled target set and freeze the rest. Which block depends on the distribution shift: the first block for
input-level shifts (corruptions), a middle one for feature-level shifts, the last layer for output-level shifts."""

_EPILOG = """\
examples:
  surgical-peft blocks microsoft/resnet-18
  surgical-peft rank demo-resnet digits --shift contrast --plot ranking.png
  surgical-peft train --help
  surgical-peft predict --model demo-resnet --adapter ADAPTER_DIR digits --output predictions.csv
  surgical-peft demo

Run 'surgical-peft COMMAND --help' for the options of a command."""


def build_parser() -> argparse.ArgumentParser:
    """The `surgical-peft` argument parser.

    Example:
        >>> build_parser().parse_args(["rank", "demo-resnet", "digits", "--criterion", "snr"]).criterion
        'snr'
    """
    parser = argparse.ArgumentParser(
        prog="surgical-peft", description=_DESCRIPTION, epilog=_EPILOG, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command", required=True)
    for name in COMMANDS.names:
        command = COMMANDS.get(name)
        subparser = commands.add_parser(
            name,
            help=command.help,
            description=command.description,
            epilog=command.epilog,
            formatter_class=HelpFormatter,
        )
        command.add_arguments(subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status: 2 on bad input, with a message on stderr; 130 when interrupted
    (Ctrl-C), with one line on stderr saying where the run stands and the command that resumes it.

    Example:
        >>> main(["blocks", "./no-such-model"])
        2
    """
    args = build_parser().parse_args(argv)
    prefix = f"surgical-peft {args.command}:"
    try:
        COMMANDS.get(args.command).run(args)
    except Interrupted as error:
        command = ["surgical-peft", *(sys.argv[1:] if argv is None else argv)]
        print(f"{prefix} {error.resume_line(command)}", file=sys.stderr)
        return _INTERRUPTED
    except KeyboardInterrupt:
        print(f"{prefix} interrupted; nothing was saved.", file=sys.stderr)
        return _INTERRUPTED
    except (SurgicalPeftError, ValueError, OSError, ImportError) as error:
        print(f"{prefix} error: {error}", file=sys.stderr)
        return 2
    return 0
