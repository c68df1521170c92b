"""The documentation site is tested like code.

- Each page's Python blocks run, in order and sharing one namespace as a reader runs them, in a fresh directory
  (mktestdocs, the `test` extra). A block that needs the Hub is written ```` ```python title="Needs the Hub: ..." ````
  (the site shows the title above it) and is reported here as skipped; any other Python block must run.
- The command-line and API reference pages, which `docs/hooks/reference.py` writes when the site is built, cover
  every subcommand, option and public name, and every public function and class there shows a `>>>` example that
  runs (pytest's `--doctest-modules` runs them).

`mkdocs build --strict` (broken links, anchors and API references) runs in `.ci/run`, where the `docs` extra is
installed.
"""

from __future__ import annotations

import argparse
import doctest
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
GENERATED_ELSEWHERE = DOCS / "benchmark-results"  # a link to benchmarks/results: pages the benchmarks write
HUB_TITLE = 'title="Needs the Hub'
FENCE = re.compile(r"^```(\S*)(.*)$", re.MULTILINE)


def _pages() -> list[Path]:
    return sorted(page for page in DOCS.rglob("*.md") if GENERATED_ELSEWHERE not in page.parents)


def _python_fences(page: Path) -> list[tuple[int, str]]:
    """(line, info string) of each opening Python fence of a page."""
    text = page.read_text()
    fences, inside = [], False
    for match in FENCE.finditer(text):
        if not inside and match.group(1) in {"python", "py", "python3", "pycon"}:
            fences.append((text.count("\n", 0, match.start()) + 1, match.group(0)[3:]))
        inside = not inside
    return fences


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOCS))


RUNNABLE = [page for page in _pages() if any(info == "python" for _, info in _python_fences(page))]
NEEDS_HUB = [(page, line) for page in _pages() for line, info in _python_fences(page) if HUB_TITLE in info]


def _hook():
    spec = importlib.util.spec_from_file_location("docs_reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", RUNNABLE, ids=_page_id)
def test_python_blocks_run(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mktestdocs = pytest.importorskip("mktestdocs", reason="the docs' blocks run with mktestdocs (the test extra)")
    monkeypatch.chdir(tmp_path)  # the blocks save adapters and checkpoints where they run
    mktestdocs.check_md_file(page, memory=True)


@pytest.mark.parametrize(("page", "line"), NEEDS_HUB, ids=[f"{_page_id(page)}:{line}" for page, line in NEEDS_HUB])
def test_hub_blocks_are_skipped(page: Path, line: int) -> None:
    pytest.skip(f"{_page_id(page)}:{line} needs the Hub (the tests run offline)")


def test_every_python_block_runs_or_says_it_needs_the_hub() -> None:
    escaped = [
        f"{_page_id(page)}:{line}: ```{info}"
        for page in _pages()
        for line, info in _python_fences(page)
        if info != "python" and HUB_TITLE not in info
    ]
    assert not escaped, 'write ```python (it runs) or ```python title="Needs the Hub: ...":\n' + "\n".join(escaped)


def test_cli_reference_has_every_command_and_option() -> None:
    from surgical_peft.cli.main import build_parser

    page = _hook().cli_page()
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    assert commands.choices, "the parser has no subcommands"
    for name, subparser in commands.choices.items():
        section = page.split(f"## `surgical-peft {name}`", 1)[1].split("\n## ", 1)[0]
        for action in subparser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            shown = action.option_strings[0] if action.option_strings else action.metavar or action.dest.upper()
            assert shown in section, f"{name}: {shown} is missing"
            if action.default not in (None, argparse.SUPPRESS) and action.nargs != 0:
                row = next(line for line in section.splitlines() if re.match(rf"\| `{re.escape(shown)}[ `,]", line))
                assert f"`{action.default}`" in row, f"{name} {shown}: default {action.default!r} not in {row!r}"


def test_api_reference_documents_every_public_name() -> None:
    hook = _hook()
    page = hook.api_page()
    modules = hook.api_modules()
    assert {"surgical_peft", "surgical_peft.training", "surgical_peft.privacy", "surgical_peft.hub"} <= set(modules)
    for module_name in modules:
        module = importlib.import_module(module_name)
        assert hook.public_names(module_name) == list(module.__all__)
        for name in module.__all__:
            path = hook.defining_path(module_name, name)
            owner, _, attribute = path.rpartition(".")
            assert getattr(importlib.import_module(owner), attribute) is getattr(module, name), path
            assert f"::: {path}\n" in page or f"][{path}]" in page, f"{module_name}.{name} is not on the API page"


def _runs_an_example(docstring: str | None) -> bool:
    """Whether `docstring` holds a `>>>` example that its doctest runs (not every line marked `+SKIP`)."""
    examples = doctest.DocTestParser().get_examples(docstring or "")
    return any(not example.options.get(doctest.SKIP, False) for example in examples)


def test_every_public_function_and_class_has_a_runnable_example() -> None:
    # Constants and other objects in an `__all__` are exempt: their docstrings are attribute docstrings beside them.
    hook = _hook()
    missing: dict[str, str] = {}  # where each name is defined -> where the API page first lists it
    for module_name in hook.api_modules():
        module = importlib.import_module(module_name)
        for name in hook.public_names(module_name):
            value = getattr(module, name)
            if (inspect.isroutine(value) or inspect.isclass(value)) and not _runs_an_example(value.__doc__):
                missing.setdefault(hook.defining_path(module_name, name), f"{module_name}.{name}")
    assert not missing, "no runnable >>> example in the docstring of: " + ", ".join(missing.values())
