"""The `surgical-peft` subcommands, one module each: `blocks`, `demo`, `predict`, `push`, `rank`, `train`.

A command is an object with `help`, `description` and `epilog` (for its `--help`), `add_arguments(parser)` and
`run(args)`; `COMMANDS` finds them by module name.

Example:
    >>> COMMANDS.names
    ('blocks', 'demo', 'predict', 'push', 'rank', 'train')
"""

from ...registry import Registry

__all__ = ["COMMANDS"]

COMMANDS: Registry = Registry(__name__, __path__, kind="command", attribute="COMMAND")
"""The subcommands, by name."""
