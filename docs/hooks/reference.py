"""MkDocs hook: the API and command-line reference pages, written at build time from the code so they cannot drift.

- `reference/api.md`: one section per public module, one mkdocstrings entry per name in its `__all__`. The modules are
  `surgical_peft`, each of its subpackages that declares `__all__` (for one that does not, such as `experiments`, its
  modules that do) and the top-level modules in `TOP_LEVEL_MODULES`. `__all__` is read from the source with `ast`,
  and each name is followed to the module that defines it (through a package's lazy `_LAZY` table or a
  `from .x import name`), so a name added to an `__all__` appears without editing the docs, and nothing is imported.
- `reference/cli.md`: every `surgical-peft` subcommand and option with its help, default and choices, read from
  `surgical_peft.cli.main.build_parser()` (argparse has no public API to walk a parser: this reads `_actions`,
  `_action_groups` and the subparsers' `choices`, as sphinx-argparse does).

`mkdocs.yml` names this file under `hooks:`; `tests/test_docs.py` imports it to check both pages.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
PACKAGE = "surgical_peft"
TOP_LEVEL_MODULES = ("features", "errors", "registry")
"""Modules directly under the package whose `__all__` is public API (the rest are the library's own plumbing)."""

API_PAGE = "reference/api.md"
CLI_PAGE = "reference/cli.md"
_USAGE_WIDTH = 80
_SHORT_CHOICES = 24  # characters of `{a,b,c}` shown beside the option; longer lists are listed in its help


# ---------------------------------------------------------------------------------------------------------- the API


def _source(module: str) -> Path:
    path = SRC.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _literal(tree: ast.Module, name: str) -> object:
    """The literal value a module assigns to `name` at its top level, or None."""
    for node in tree.body:
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        )
        if any(isinstance(target, ast.Name) and target.id == name for target in targets) and node.value is not None:
            return ast.literal_eval(node.value)
    return None


def _parse(module: str) -> ast.Module:
    return ast.parse(_source(module).read_text())


def public_names(module: str) -> list[str]:
    """The names in a module's `__all__` (empty when it has none)."""
    return list(_literal(_parse(module), "__all__") or [])


def _imported_from(tree: ast.Module, module: str, name: str) -> str | None:
    """The module a top-level `from ... import name` in `module` reads `name` from."""
    package = module if _source(module).name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any((alias.asname or alias.name) == name for alias in node.names):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            return (f"{base}.{node.module}" if node.module else base) if node.level else node.module
    return None


def defining_path(module: str, name: str) -> str:
    """The dotted path of the module-level object `module.name` where it is defined (what mkdocstrings documents).

    >>> defining_path("surgical_peft", "SurgicalConfig")
    'surgical_peft.tuner.config.SurgicalConfig'
    """
    tree = _parse(module)
    lazy = _literal(tree, "_LAZY") or {}
    if name in lazy:
        return defining_path(f"{module}.{lazy[name]}", name)
    source = _imported_from(tree, module, name)
    return defining_path(source, name) if source else f"{module}.{name}"


def api_modules() -> list[str]:
    """The modules the API page documents, in order: the package, its subpackages, then `TOP_LEVEL_MODULES`."""
    modules = [PACKAGE]
    for folder in sorted(path for path in (SRC / PACKAGE).iterdir() if (path / "__init__.py").exists()):
        if folder.name.startswith("_"):
            continue
        subpackage = f"{PACKAGE}.{folder.name}"
        if public_names(subpackage):
            modules.append(subpackage)
        else:
            inner = sorted(f"{subpackage}.{file.stem}" for file in folder.glob("[!_]*.py"))
            modules += [module for module in inner if public_names(module)]
    return modules + [f"{PACKAGE}.{name}" for name in TOP_LEVEL_MODULES]


def api_page() -> str:
    """The API reference: each module's docstring, then each public name defined nowhere earlier on the page."""
    lines = [
        "# API reference",
        "",
        "Every public name of `surgical_peft`, module by module: the names in each module's `__all__`, with their "
        "docstrings (generated when the site is built; the examples run as doctests). A name that several modules "
        "export is documented where it first appears and linked from the others.",
        "",
    ]
    documented: dict[str, str] = {}
    for module in api_modules():
        lines += [
            f"::: {module}",
            "    options:",
            "      members: false",
            "      heading_level: 2",
            "      show_root_full_path: true",
            "",
        ]
        also = []
        for name in public_names(module):
            path = defining_path(module, name)
            if path in documented:
                also.append(f"[`{name}`][{path}] (from `{documented[path]}`)")
                continue
            documented[path] = module
            lines += [f"::: {path}", "    options:", "      heading_level: 3", ""]
        if also:
            lines += ["Also exported here: " + ", ".join(also) + ".", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- the command line


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = parser.formatter_class(prog=parser.prog, width=_USAGE_WIDTH)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(action: argparse.Action, prog: str) -> str:
    """An action's help with argparse's `%(...)s` fields filled in, as `--help` shows it."""
    fields = {key: value for key, value in vars(action).items() if value is not argparse.SUPPRESS}
    fields = {key: getattr(value, "__name__", value) for key, value in fields.items()}
    if fields.get("choices") is not None:
        fields["choices"] = ", ".join(map(str, fields["choices"]))
    return (action.help or "") % {**fields, "prog": prog}


def _choices(action: argparse.Action) -> str | None:
    """The choices as argparse shows them (`{a,b}`), or None."""
    return None if action.choices is None else "{" + ",".join(map(str, action.choices)) + "}"


def _invocation(action: argparse.Action) -> str:
    """How the argument is written; long choices go to the help column instead (`_help_cell`)."""
    choices = _choices(action)
    metavar = action.metavar or (choices if choices and len(choices) <= _SHORT_CHOICES else action.dest.upper())
    if not action.option_strings:
        return metavar
    takes_value = action.nargs != 0
    return ", ".join(f"{option} {metavar}" if takes_value else option for option in action.option_strings)


def _default(action: argparse.Action) -> str:
    if action.nargs == 0 or action.default is None or action.default is argparse.SUPPRESS:
        return ""
    return f"`{action.default}`"


def _cell(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("|", "\\|").replace("<", "&lt;").strip()


def _help_cell(action: argparse.Action, prog: str) -> str:
    text = _help(action, prog)
    choices = _choices(action)
    if choices and len(choices) > _SHORT_CHOICES and not action.metavar:
        text += f" (one of: {', '.join(f'`{choice}`' for choice in action.choices)})"
    return text


def _rows(action: argparse.Action, prog: str) -> Iterator[str]:
    """Table rows: one per option or positional argument; one per subcommand for the subcommands' action."""
    if isinstance(action, argparse._SubParsersAction):
        for choice in action._choices_actions:
            yield f"| [`{choice.dest}`](#surgical-peft-{choice.dest}) | {_cell(choice.help or '')} |"
        return
    yield f"| `{_cell(_invocation(action))}` | {_cell(_help_cell(action, prog))} | {_default(action)} |"


def _arguments(parser: argparse.ArgumentParser) -> Iterator[str]:
    for group in parser._action_groups:
        actions = [action for action in group._group_actions if not isinstance(action, argparse._HelpAction)]
        if not actions:
            continue
        yield f"**{group.title}**" if group.title else ""
        yield ""
        if any(isinstance(action, argparse._SubParsersAction) for action in actions):
            yield from ("| command | what |", "|---|---|")
        else:
            yield from ("| argument | what | default |", "|---|---|---|")
        for action in actions:
            yield from _rows(action, parser.prog)
        yield ""


def _prose(lines: list[str]) -> list[str]:
    """Help text as Markdown: hard-wrapped lines joined into paragraphs, indented lines (a list of names, commands)
    kept as they are in a block."""
    blocks: list[str] = []
    for indented, group in itertools.groupby(lines, key=lambda line: line.startswith(" ")):
        group = list(group)
        if indented:
            blocks += ["```text", textwrap.dedent("\n".join(group)), "```", ""]
        else:
            paragraphs = "\n".join(group).split("\n\n")
            blocks += [_cell(paragraph) + "\n" for paragraph in paragraphs if paragraph.strip()]
    return blocks


def _text(text: str | None) -> list[str]:
    """A description or epilog: its `examples:` become a shell block, the rest prose."""
    if not text:
        return []
    head, _, examples = text.partition("examples:\n")
    lines = _prose(head.strip("\n").splitlines())
    if examples:
        commands = list(itertools.takewhile(lambda line: line.startswith(" "), examples.splitlines()))
        rest = examples.splitlines()[len(commands) :]
        lines += ["Examples:", "", "```bash", *(command.strip() for command in commands), "```", ""]
        lines += _prose([line for line in rest if line.strip()])
    return lines


def cli_page() -> str:
    """The command-line reference: the top-level parser, then each subcommand with its usage and every option."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))  # this checkout's parser, as mkdocstrings reads this checkout's docstrings
    from surgical_peft.cli.main import build_parser

    parser = build_parser()
    lines = [
        "# Command line",
        "",
        "`surgical-peft` (also `python -m surgical_peft.cli`), generated from its argparse parser when the site is "
        "built, so every subcommand and option is here with the help `--help` prints. Every command also takes "
        "`-h, --help`. Bad input prints one line and exits with status 2.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        *_text(parser.description),
        *_arguments(parser),
        *_text(parser.epilog),
    ]
    for name, subparser in _subcommands(parser).items():
        lines += [f"## `surgical-peft {name}`", "", "```text", _usage(subparser), "```", ""]
        lines += [*_text(subparser.description), *_arguments(subparser), *_text(subparser.epilog)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the hook


def on_files(files: Files, config: MkDocsConfig) -> Files:
    """Add the generated pages to the site's files."""
    from mkdocs.structure.files import File

    for uri, content in ((API_PAGE, api_page()), (CLI_PAGE, cli_page())):
        files.append(File.generated(config, uri, content=content))
    return files
