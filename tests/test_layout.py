"""The package's layering: no import cycles (function-level imports included), and `import surgical_peft` stays light.

Imports are read from the source with `ast`, so every module counts, whether or not a test imports it. Importing
`a.b.c` also runs `a/__init__.py` and `a/b/__init__.py`, so those count as imported too, except the packages that hold
the importing module (Python has started them already).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "surgical_peft"
ROOT = "surgical_peft"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imported(module: str, path: Path) -> set[str]:
    """The package's modules that `module` imports anywhere (functions included, `if TYPE_CHECKING:` excluded)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and _is_type_checking(node)
        for child in ast.walk(node)
    }
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import shifts`
    found = set()
    for name in names:
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # the packages on the way run too
            candidate = ".".join(parts[:depth])
            if candidate in MODULES and not module.startswith(candidate + ".") and candidate != module:
                found.add(candidate)
    return found


GRAPH = {module: _imported(module, path) for module, path in MODULES.items()}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        stack.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                return [*stack[stack.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        stack.pop()
        state[module] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_the_walker_sees_imports() -> None:
    assert "surgical_peft.tuner.config" in GRAPH["surgical_peft.tuner.model"]
    assert "surgical_peft.cli.models" in GRAPH["surgical_peft.cli.commands.blocks"]  # in a function
    assert "surgical_peft.training" in GRAPH["surgical_peft.criteria.sweep"]


def test_no_import_cycles() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("lower", "higher"),
    [
        ("surgical_peft.tuner", "surgical_peft.training"),
        ("surgical_peft.tuner", "surgical_peft.selection"),
        ("surgical_peft.blocks", "surgical_peft.tuner"),
        ("surgical_peft.training", "surgical_peft.cli"),
        ("surgical_peft.selection", "surgical_peft.training"),
        ("surgical_peft.experiments", "surgical_peft.cli"),
        ("surgical_peft.serving", "surgical_peft.tuner"),  # the tuner calls serving; serving reads it duck-typed
        ("surgical_peft.serving", "surgical_peft.cli"),
    ],
)
def test_layers(lower: str, higher: str) -> None:
    """No module of a lower layer imports a higher one."""
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if module == lower or module.startswith(lower + ".")
        for target in targets
        if target == higher or target.startswith(higher + ".")
    )
    assert not wrong, wrong


# Seconds each to import: what `import surgical_peft` and the command line's help must not cost.
HEAVY = ["torch", "peft", "transformers", "accelerate", "datasets", "evaluate", "matplotlib", "numpy", "PIL"]
HEAVY_LAYERS = [
    "surgical_peft.tuner",
    "surgical_peft.blocks.listing",  # (the package itself loads its names lazily: the options read blocks.names)
    "surgical_peft.training.loop",
    "surgical_peft.selection",
]

# `python -m surgical_peft.cli ARGV`, in-process so that its `sys.modules` can be read after it exits.
RUN_CLI = """
import runpy, sys
sys.argv = ["surgical-peft", *{argv!r}]
try:
    runpy.run_module("surgical_peft.cli", run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
"""


def _loaded_after(script: str, modules: list[str]) -> list[str]:
    """Which of `modules` are in `sys.modules` after `script` runs in a fresh interpreter."""
    check = f"\nimport json, sys\nprint(json.dumps([name for name in {modules!r} if name in sys.modules]))"
    result = subprocess.run([sys.executable, "-c", script + check], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def test_importing_the_package_stays_light() -> None:
    """`import surgical_peft` imports neither torch nor PEFT: its names load on first use, and it registers with PEFT
    once PEFT is imported (`surgical_peft.registration`, tested in test_registration.py)."""
    assert _loaded_after("import surgical_peft", [*HEAVY, *HEAVY_LAYERS, "surgical_peft.training"]) == []


@pytest.mark.parametrize(
    "argv", [["--help"], ["train", "--help"], ["rank", "--help"], ["blocks", "-h"], ["demo", "-h"], ["predict", "-h"]]
)
def test_the_command_lines_help_stays_light(argv: list[str]) -> None:
    """`surgical-peft [COMMAND] --help` builds every command's parser without torch, PEFT, transformers, Accelerate
    or `datasets` (their defaults are copied in `surgical_peft.cli.defaults`)."""
    assert _loaded_after(RUN_CLI.format(argv=argv), [*HEAVY, *HEAVY_LAYERS]) == []
