"""demo: what `python examples/train.py` (no arguments) prints on a fresh install, written to a results file.

Each run is the demo as a user runs it: `python examples/train.py` in a fresh process, in an empty working directory,
with an empty source-model cache (`SURGICAL_PEFT_CACHE`), so that the demo's source model is pretrained too. A run
may set environment variables: `ATEN_CPU_CAPABILITY=avx2` has PyTorch use its AVX2 kernels on an AVX-512 CPU (what
another machine computes), `PYTHONPATH=<dir>` puts other releases of packages (installed with
`pip install --no-deps --target <dir> transformers==5.24.0`) in front of the installed ones. The results file holds
each run's printed table, its package versions and, row by row, how far the runs' accuracies are apart.

Usage:
    python benchmarks/demo.py                   # this CPU's kernels and AVX2's: benchmarks/results/demo.md, ~3 min
    python benchmarks/demo.py --run "transformers 5.24=PYTHONPATH=/path/to/tf-5.24"   # one more run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "examples" / "train.py"
PACKAGES = ("torch", "transformers", "accelerate", "peft", "datasets", "scikit-learn", "numpy", "pillow")
VERSIONS = f"""
import importlib.metadata as metadata, json, torch
versions = {{name: metadata.version(name) for name in {PACKAGES!r}}}
print(json.dumps({{**versions, "torch kernels": torch.backends.cpu.get_cpu_capability()}}))
"""
DEFAULT_RUNS = ("this CPU's kernels=", "AVX2 kernels=ATEN_CPU_CAPABILITY=avx2")


def parse_run(text: str) -> tuple[str, dict[str, str]]:
    """`"LABEL=VAR=VALUE,VAR=VALUE"` (or `"LABEL="`: no variables) -> the label and the variables."""
    label, _, assignments = text.partition("=")
    variables = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return label, variables


def run_demo(label: str, variables: dict[str, str]) -> dict[str, object]:
    """Run `python examples/train.py` as a fresh install does; returns what it printed, its results and versions."""
    with tempfile.TemporaryDirectory(prefix="surgical-peft-demo-") as scratch:
        env = {**os.environ, "SURGICAL_PEFT_CACHE": str(Path(scratch, "cache")), **variables}
        if "PYTHONPATH" in variables:  # in front of the project's own path, as the variable is meant
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [variables["PYTHONPATH"], os.environ.get("PYTHONPATH")]))
        versions = subprocess.run([sys.executable, "-c", VERSIONS], env=env, capture_output=True, text=True)
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, str(TRAIN)], cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        seconds = time.perf_counter() - start
        if result.returncode != 0 or versions.returncode != 0:
            raise SystemExit(f"{label}: the demo failed (exit {result.returncode}): {versions.stderr[-2000:]}")
        return {
            "label": label,
            "variables": variables,
            "versions": json.loads(versions.stdout),
            "printed": result.stdout.decode().strip(),
            "results": json.loads(Path(scratch, "outputs", "demo", "results.json").read_text()),
            "seconds": seconds,
        }


def comparison(runs: list[dict[str, object]]) -> list[str]:
    """A table of every row's accuracy per run and the largest gap between runs, in points."""
    labels = [run["label"] for run in runs]
    lines = [f"| row | {' | '.join(labels)} | largest gap |", "|---|" + "---|" * (len(runs) + 1)]
    for row in runs[0]["results"]["accuracy"]:
        values = [100 * run["results"]["accuracy"][row] for run in runs]
        cells = " | ".join(f"{value:.1f}%" for value in values)
        lines.append(f"| {row} | {cells} | {max(values) - min(values):.1f} |")
    return lines


def write_results(runs: list[dict[str, object]], path: Path) -> None:
    """The results file: the machine, then each run (versions, what it printed), then the comparison."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# The demo on a fresh install",
        "",
        f"Produced by `python benchmarks/demo.py` on {time.strftime('%Y-%m-%d')}: `python examples/train.py` (no "
        "arguments) in a fresh process per run, with an empty source-model cache, so the source model is pretrained "
        f"too. Machine: {platform.machine()} CPU, {os.cpu_count()} cores, load average {load:.1f} at the end, "
        f"Python {platform.python_version()}.",
    ]
    for run in runs:
        versions = ", ".join(f"{name} {version}" for name, version in run["versions"].items())
        variables = " ".join(f"{key}={value}" for key, value in run["variables"].items()) or "none"
        lines += ["", f"## {run['label']}", "", f"Environment variables: {variables}. {versions}.", ""]
        lines += [f"`python examples/train.py` printed, in {run['seconds']:.0f} s:", "", "```", run["printed"], "```"]
    if len(runs) > 1:
        lines += ["", "## Runs compared (target accuracy, mean over the demo's 3 seeds)", "", *comparison(runs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--run",
        action="append",
        metavar="LABEL=VAR=VALUE,...",
        help=f"one more run, with its environment variables (after {' and '.join(map(repr, DEFAULT_RUNS))})",
    )
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "demo.md")
    args = parser.parse_args()
    runs = [run_demo(*parse_run(text)) for text in (*DEFAULT_RUNS, *(args.run or []))]
    write_results(runs, args.output)
    print(args.output.read_text())


if __name__ == "__main__":
    main()
