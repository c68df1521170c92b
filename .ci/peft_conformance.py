"""Run PEFT's own test suites on `SurgicalConfig`: the generic tuner suite, or the config suite.

PEFT holds every method to `PeftCommonTester`, driven by `tests/test_custom_models.py` over toy models (`--suite
generic`, the default), and every config class to `tests/test_config.py` (`--suite config`). Both ship in PEFT's
source distribution, so this script:

1. downloads the sdist of the installed peft version once (`pip download --no-deps --no-binary :all:`) into
   `.cache/peft-sdist/`, and stops with a one-line message if the package registry cannot be reached;
2. extracts its `tests/` (and PEFT's pytest settings), adds `tests/__init__.py` (the suite's imports are relative) and
   inserts the SURGICAL rows into the suite's table right before the line it is read from (`TEST_CASES` before
   `ALL_PEFT_CONFIG_CLASSES` is computed; `ALL_CONFIG_CLASSES` before `LAYER_INDEXING_CONFIG_CLASSES`);
3. runs the suite's SURGICAL tests with pytest (`-k`), leaving out those that need the Hub (`Suite.needs_hub`), reads
   the junit xml and prints the counts by test;
4. exits with status 1 when fewer tests pass than the suite's floor (`.ci/peft_conformance_floor`,
   `.ci/peft_config_floor`), or, for a suite that must pass entirely, when any fails.

The generic suite imports diffusers: `pip install diffusers` first (it does not pull torch). `docs/peft-conformance.md`
explains each remaining failure. Usage: `python .ci/peft_conformance.py [--suite generic|config] [--junit-xml PATH]
[--keep-going]`.
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"

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


@dataclass(frozen=True)
class Suite:
    """One of PEFT's test files, with the SURGICAL rows inserted into the table it is parametrised over."""

    test_file: str
    anchor: str  # the line the rows are inserted before: where the table is read
    rows: str  # Python code that adds the rows to the table
    selector: str  # pytest's -k expression (case-insensitive) for the SURGICAL tests
    floor_file: Path
    needs_hub: tuple[str, ...] = ()  # test functions left out: they download from the Hub
    must_all_pass: bool = False

    def node_prefixes(self) -> list[str]:
        """pytest node-id prefixes of the `needs_hub` tests (`name[` takes that function's parametrisations only)."""
        return [f"tests/{self.test_file}::{name}[" for name in self.needs_hub]


_GENERIC_ROWS = "".join(f"    ({name!r}, {model!r}, SurgicalConfig, {kwargs!r}),\n" for name, model, kwargs in ROWS)
SUITES = {
    "generic": Suite(
        test_file="test_custom_models.py",
        anchor="ALL_PEFT_CONFIG_CLASSES = sorted(",
        rows=f"TEST_CASES += [\n{_GENERIC_ROWS}]\n\n",
        selector="SURGICAL",  # the rows above and the `SurgicalConfig` parameter ids
        floor_file=REPO / ".ci" / "peft_conformance_floor",
    ),
    "config": Suite(
        test_file="test_config.py",
        anchor="LAYER_INDEXING_CONFIG_CLASSES = [",
        rows="ALL_CONFIG_CLASSES += ((SurgicalConfig, {}),)\n\n",
        # the tests parametrised with SurgicalConfig, and the one that builds a config of every registered PeftType
        selector="SurgicalConfig or test_from_peft_type",
        floor_file=REPO / ".ci" / "peft_config_floor",
        # each loads peft-internal-testing/tiny-opt-lora-revision from the Hub
        needs_hub=(
            "TestPeftConfig::test_from_pretrained",
            "TestPeftConfig::test_from_pretrained_cache_dir",
            "TestPeftConfig::test_save_pretrained_with_runtime_config",
        ),
        must_all_pass=True,
    ),
}


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


def prepare_suite(archive: Path, version: str, suite: Suite) -> Path:
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
    test_file = root / "tests" / suite.test_file
    source = test_file.read_text()
    if source.count(suite.anchor) != 1:
        raise ConformanceError(f"peft {version}'s {suite.test_file} no longer has one line `{suite.anchor}`")
    source = "from surgical_peft import SurgicalConfig\n" + source.replace(suite.anchor, suite.rows + suite.anchor)
    test_file.write_text(source)
    return root


def run_suite(root: Path, suite: Suite, junit_xml: Path) -> None:
    """Run the SURGICAL tests of `suite` but those that need the Hub, writing `junit_xml` (a failing test does not
    raise)."""
    command = [sys.executable, "-m", "pytest", f"tests/{suite.test_file}", "-k", suite.selector, "-o", "addopts="]
    options = ["-p", "no:cacheprovider", "-q", "--no-header", "-rN", "--tb=no", f"--junitxml={junit_xml}"]
    left_out = [option for prefix in suite.node_prefixes() for option in ("--deselect", prefix)]
    subprocess.run([*command, *options, *left_out], cwd=root, check=False)
    if not junit_xml.is_file():
        raise ConformanceError(f"pytest wrote no report at {junit_xml}: the suite could not be collected (see above)")


def outcomes(junit_xml: Path) -> dict[str, Counter]:
    """`{test function: Counter(passed=, failed=, skipped=)}` over the test cases of a junit xml report (the run
    selected the SURGICAL ones)."""
    table: dict[str, Counter] = defaultdict(Counter)
    for case in ElementTree.parse(junit_xml).iter("testcase"):
        children = {child.tag for child in case}
        outcome = "failed" if children & {"failure", "error"} else "skipped" if "skipped" in children else "passed"
        table[case.get("name", "").split("[")[0]][outcome] += 1
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
    parser.add_argument("--suite", choices=list(SUITES), default="generic", help="Which of PEFT's suites to run.")
    parser.add_argument("--junit-xml", type=Path, default=None, help="Default: .cache/peft-conformance/<suite>.xml")
    parser.add_argument("--keep-going", action="store_true", help="Report the counts but never fail on the floor.")
    args = parser.parse_args(argv)
    suite = SUITES[args.suite]
    junit_xml = args.junit_xml or CACHE / "peft-conformance" / f"{args.suite}.xml"
    try:
        if args.suite == "generic" and importlib.util.find_spec("diffusers") is None:
            raise ConformanceError("PEFT's test suite imports diffusers: `pip install diffusers` first")
        version = importlib.metadata.version("peft")
        root = prepare_suite(sdist(version), version, suite)
        junit_xml.parent.mkdir(parents=True, exist_ok=True)
        junit_xml.unlink(missing_ok=True)
        run_suite(root, suite, junit_xml.resolve())
    except ConformanceError as error:
        print(f"peft_conformance: {error}", file=sys.stderr)
        return 2
    if suite.needs_hub:
        print(f"left out (they need the Hub): {', '.join(name.split('::')[-1] for name in suite.needs_hub)}")
    totals = report(outcomes(junit_xml))
    floor = int(suite.floor_file.read_text().split()[0])
    name = f"peft_conformance --suite {args.suite}"
    if not args.keep_going and (totals["passed"] < floor or (suite.must_all_pass and totals["failed"])):
        rule = f"floor {floor}, {suite.floor_file.name}" + ("; every test must pass" if suite.must_all_pass else "")
        print(f"{name}: {totals['passed']} tests passed, {totals['failed']} failed ({rule})")
        return 1
    print(f"{name}: {totals['passed']} passed (floor {floor}), peft {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
