"""The command line (`surgical-peft`): the commands (`commands/`), a run's settings (`arguments.py`, whose fields are
the options), the one model loader (`models.py`), the target data (`target.py`) and the training recipe (`recipe.py`).
Building the parser imports neither torch nor PEFT (so `--help` answers at once): each command imports what it runs in
`run`, and the defaults the parser shows that live in heavy modules are copied in `defaults.py`.

Example:
    >>> from surgical_peft.cli import build_parser
    >>> build_parser().parse_args(["blocks", "demo-resnet"]).command
    'blocks'
"""

from .main import build_parser, main

__all__ = ["build_parser", "main"]
