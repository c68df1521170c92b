"""`surgical-peft blocks MODEL`: list a model's blocks with their parameter counts."""

from __future__ import annotations

import argparse

from ..arguments import MODEL_HELP

__all__ = ["COMMAND"]


class Blocks:
    help = "list a model's blocks with their parameter counts"
    description = (
        "List the blocks surgical fine-tuning can tune, in forward order, with their parameter counts\n"
        "and the modules they hold. The names are what SurgicalConfig(block=...) and 'train --block' take."
    )
    epilog = (
        "examples:\n  surgical-peft blocks microsoft/resnet-18\n  surgical-peft blocks ./my-model\n"
        "  surgical-peft blocks demo-resnet"
    )

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model", metavar="MODEL", help=MODEL_HELP)

    def run(self, args: argparse.Namespace) -> None:
        from ...blocks import list_blocks
        from ..models import load_model

        print(list_blocks(load_model(args.model, pretrained=False).model))


COMMAND = Blocks()
