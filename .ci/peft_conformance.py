"""Run PEFT's own generic tuner suite (`tests/test_custom_models.py`) on `SurgicalConfig`.

PEFT holds every method to `PeftCommonTester`, driven by `tests/test_custom_models.py` over toy models. The suite ships
in PEFT's source distribution, so this script:

1. downloads the sdist of the installed peft version once (`pip download --no-deps --no-binary :all:`) into
   `.cache/peft-sdist/`, and stops with a one-line message if the package registry cannot be reached;
2. extracts its `tests/` (and PEFT's pytest settings), adds `tests/__init__.py` (the suite's imports are relative) and
   inserts the SURGICAL rows below into `TEST_CASES` right before `ALL_PEFT_CONFIG_CLASSES` is computed;
3. runs `pytest tests/test_custom_models.py -k SURGICAL` (which also selects the tests parametrised over
   `ALL_PEFT_CONFIG_CLASSES` with `SurgicalConfig`), reads the junit xml and prints the counts by test;
4. exits with status 1 when fewer tests pass than the floor stored in `.ci/peft_conformance_floor`.

The suite imports diffusers: `pip install diffusers` first (it does not pull torch). `docs/peft-conformance.md`
explains each remaining failure. Usage: `python .ci/peft_conformance.py [--junit-xml PATH] [--keep-going]`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
FLOOR_FILE = REPO / ".ci" / "peft_conformance_floor"
ANCHOR = "ALL_PEFT_CONFIG_CLASSES = sorted("
SELECTOR = "SURGICAL"  # pytest's -k is case-insensitive: the rows below and the `SurgicalConfig` parameter ids

# (name, toy model of test_custom_models.py, SurgicalConfig kwargs): every kind of module the toy models offer.
ROWS: list[tuple[str, str, dict]] = [
    ("Vanilla MLP 1 SURGICAL", "MLP", {"target_modules": "lin0"}),
    ("Vanilla MLP 2 SURGICAL", "MLP", {"target_modules": ["lin0"]}),
    ("Vanilla MLP 3 SURGICAL", "MLP", {"target_modules": ["lin1"]}),
    ("Vanilla MLP 4 SURGICAL", "MLP", {"target_modules": ["lin0", "lin1"]}),
    ("Vanilla MLP 5 SURGICAL modules_to_save", "MLP", {"target_modules": ["lin0"], "modules_to_save": ["lin1"]}),
    ("Vanilla MLP 6 SURGICAL exclude_modules", "MLP", {"target_modules": r"lin\d", "exclude_modules": ["lin1"]}),
    ("MLP parameters SURGICAL", "MlpUsingParameters", {"target_modules": ["lin0"]}),
    ("Embedding 1 SURGICAL", "EmbConv1D", {"target_modules": ["emb"]}),
    ("transformers Conv1D 1 SURGICAL", "EmbConv1D", {"target_modules": ["conv1d"]}),
    ("Embedding + transformers Conv1D SURGICAL", "EmbConv1D", {"target_modules": ["emb", "conv1d"]}),
    ("Conv1d 1 SURGICAL", "Conv1d", {"target_modules": ["conv1d"]}),
    ("Conv1d groups SURGICAL", "Conv1dGroups", {"target_modules": ["conv1d"]}),
    ("Conv2d 1 SURGICAL", "Conv2d", {"target_modules": ["conv2d"]}),
    ("Conv2d 2 SURGICAL", "Conv2d", {"target_modules": ["conv2d", "lin0"]}),
    ("Conv2d 1x1 SURGICAL", "Conv2d1x1", {"target_modules": ["conv2d"]}),
    ("Conv2d groups SURGICAL", "Conv2dGroups", {"target_modules": ["conv2d"]}),
    ("Conv2d groups2 SURGICAL", "Conv2dGroups2", {"target_modules": ["conv2d"]}),
    ("Conv3d 1 SURGICAL", "Conv3d", {"target_modules": ["conv3d"]}),
    ("LayerNorm 1 SURGICAL", "MLP_LayerNorm", {"target_modules": ["layernorm0"]}),
    ("LayerNorm 2 SURGICAL", "MLP_LayerNorm", {"target_modules": ["layernorm0", "lin0"]}),
    ("MHA 1 SURGICAL", "MHA", {"target_modules": ["mha"]}),
    ("MHA 2 SURGICAL", "MHA", {"target_modules": ["mha", "lin0"]}),
]


class ConformanceError(Exception):
    """A problem the script reports in one line (no traceback)."""


def sdist(version: str) -> Path:
    """PEFT's source distribution for `version`, downloaded once into the cache."""
    folder = CACHE / "peft-sdist"
    archive = folder / f"peft-{version}.tar.gz"
    if archive.is_file():
        return archive
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--dest", str(folder)]
    result = subprocess.run([*command, f"peft=={version}"], capture_output=True, text=True)
    if result.returncode != 0 or not archive.is_file():
        said = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConformanceError(
            f"cannot download the source distribution of peft=={version} from the package registry (needed once, "
            f"then cached in {folder}); pip said: {said}"
        )
    return archive


def prepare_suite(archive: Path, version: str) -> Path:
    """Extract PEFT's tests and pytest settings next to the archive and insert the SURGICAL rows; returns the root."""
    root = CACHE / "peft-conformance" / f"peft-{version}"
    shutil.rmtree(root, ignore_errors=True)
    top = f"peft-{version}/"
    with tarfile.open(archive) as tar:
        members = [
            m for m in tar.getmembers() if m.name.startswith(f"{top}tests/") or m.name == f"{top}pyproject.toml"
        ]
        tar.extractall(root.parent, members=members, filter="data")
    (root / "tests" / "__init__.py").touch()
    suite = root / "tests" / "test_custom_models.py"
    source = suite.read_text()
    if source.count(ANCHOR) != 1:
        raise ConformanceError(f"peft {version}'s test_custom_models.py no longer has one line `{ANCHOR}`")
    rows = "".join(f"    ({name!r}, {model!r}, SurgicalConfig, {kwargs!r}),\n" for name, model, kwargs in ROWS)
    insertion = f"TEST_CASES += [\n{rows}]\n\n"
    source = "from surgical_peft import SurgicalConfig\n" + source.replace(ANCHOR, insertion + ANCHOR)
    suite.write_text(source)
    return root


def run_suite(root: Path, junit_xml: Path) -> None:
    """Run the SURGICAL tests of the suite, writing `junit_xml` (a failing test does not raise)."""
    command = [sys.executable, "-m", "pytest", "tests/test_custom_models.py", "-k", SELECTOR, "-o", "addopts="]
    options = ["-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=no", f"--junitxml={junit_xml}"]
    subprocess.run([*command, *options], cwd=root, check=False)
    if not junit_xml.is_file():
        raise ConformanceError(f"pytest wrote no report at {junit_xml}: the suite could not be collected (see above)")


def outcomes(junit_xml: Path) -> dict[str, Counter]:
    """`{test function: Counter(passed=, failed=, skipped=)}` over the SURGICAL test cases of a junit xml report."""
    table: dict[str, Counter] = defaultdict(Counter)
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        name = case.get("name", "")
        if SELECTOR.lower() not in name.lower():
            continue
        children = {child.tag for child in case}
        outcome = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        table[name.split("[")[0]][outcome] += 1
    return dict(table)


def report(table: dict[str, Counter]) -> Counter:
    """Print the counts by test function (failures first) and return the totals."""
    totals = sum(table.values(), Counter())
    width = max([len(name) for name in table] + [4])
    print(f"\n{'test':<{width}}  passed  failed  skipped")
    for name, counts in sorted(table.items(), key=lambda item: (-item[1]["failed"], -item[1]["skipped"], item[0])):
        print(f"{name:<{width}}  {counts['passed']:>6}  {counts['failed']:>6}  {counts['skipped']:>7}")
    collected = sum(totals.values())
    share = 100 * totals["passed"] / collected if collected else 0.0
    print(
        f"{'total':<{width}}  {totals['passed']:>6}  {totals['failed']:>6}  {totals['skipped']:>7}"
        f"   ({collected} collected, {share:.1f}% passed)"
    )
    return totals


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--junit-xml", type=Path, default=CACHE / "peft-conformance" / "junit.xml")
    parser.add_argument("--keep-going", action="store_true", help="Report the counts but never fail on the floor.")
    args = parser.parse_args(argv)
    try:
        if importlib.util.find_spec("diffusers") is None:
            raise ConformanceError("PEFT's test suite imports diffusers: `pip install diffusers` first")
        version = importlib.metadata.version("peft")
        root = prepare_suite(sdist(version), version)
        args.junit_xml.parent.mkdir(parents=True, exist_ok=True)
        args.junit_xml.unlink(missing_ok=True)
        run_suite(root, args.junit_xml.resolve())
    except ConformanceError as error:
        print(f"peft_conformance: {error}", file=sys.stderr)
        return 2
    totals = report(outcomes(args.junit_xml))
    floor = int(FLOOR_FILE.read_text().split()[0])
    if totals["passed"] < floor and not args.keep_going:
        print(f"peft_conformance: {totals['passed']} tests passed, below the floor of {floor} ({FLOOR_FILE.name})")
        return 1
    print(f"peft_conformance: {totals['passed']} passed (floor {floor}), peft {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
