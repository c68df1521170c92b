"""attacks: the attack battery of issue 12, re-runnable. A careful user attacks the library; every attempt is
classified.

Areas:

- A, adapter files on load: tampered `adapter_config.json` (every field with several bad values, broken JSON),
  damaged weights (non-finite, negative variance, flipped bytes, truncated, empty, missing, a `.bin`, wrong shapes,
  keys and dtypes, a header announcing 8 GB in a sparse file, a name given twice), millions of module names or a 10 MB
  name, mismatched bases (a `modules_to_save` head for other labels too), each through
  `SurgicalConfig.from_pretrained`, `PeftConfig.from_pretrained`, `PeftModel.from_pretrained(base, d)` and
  `model.load_adapter(d, adapter_name="x")`;
- B, saving: `save_adapter` and PEFT's `save_pretrained` into directories that hold other files, the working
  directory, a file, a nested missing path, a read-only directory, two writers at once, and processes killed at each
  kill point of `save_adapter` (the private `_SURGICAL_PEFT_KILL_AT` hook of `surgical_peft.files`), a disk that
  fills up (a small tmpfs: the battery runs as root), symlinks to a user's files at the names `save_adapter`,
  `save_pretrained`, `train`, `rank` and `predict` write;
- C, the command line through `surgical_peft.cli.main([...])` in-process: bad numbers for every numeric option of
  `train` and `rank`, unknown choices, missing or wrong paths, broken imagefolder datasets, 16-bit and 32-bit images,
  class folders with subfolders, batches of one image where a BatchNorm layer trains;
- D, training: a non-finite loss, resuming with stray entries in `checkpoints/`, a damaged checkpoint, changed
  settings (with `run_args.json` deleted), fewer epochs, other data, Accelerate settings from the environment, two
  runs at once in one output directory, runs killed mid-epoch or mid-checkpoint (`tests/kill_driver.py`) and a disk
  that fills up while a checkpoint is written (a small tmpfs), then resumed, compared tensor by tensor with the
  uninterrupted run.

Categories (one per attempt):

- clear error: refused with an `InputError` (or a `ValueError`) whose message names the file (area A: the adapter
  directory's path; a base mismatch names the blocks instead), or, from the command line, exit status 2 with a
  one-line message (argparse's usage error counts) and the output directory as it was;
- documented: it did what the documentation (docs/) or a docstring says (cited in the note), e.g. a valid adapter
  loads and reproduces the tuned model's logits to 1e-5;
- crash: any other exception (a raw type, an error that does not name the file, or a refusal that does not name the
  cause the attempt set up), a message longer than `LONGEST_MESSAGE` characters, a traceback, a hang (no result within
  the attempt's timeout) or a dead process;
- silent: it went through when it should not have, or loaded values that differ from the adapter's;
- modified: a failed call changed the model (tensors, `requires_grad`, hooks, attributes, the adapter list), removed
  or changed a user's file, or left a refused run's output behind; no complete adapter after a kill.

Every attempt runs in a forked process with a timeout and a 6 GiB address-space limit. Results:
`benchmarks/results/attacks.md` (every attempt with its outcome and note) and `attacks.json`.

Usage (a few minutes on 2 CPU cores; offline):
    PYTHONPATH=src python benchmarks/attacks.py               # the whole battery
    PYTHONPATH=src python benchmarks/attacks.py --area A      # one area (repeatable)
    PYTHONPATH=src python benchmarks/attacks.py --match fingerprint --no-write   # attempts whose name matches
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import transformers
from peft import PeftConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_save
from torch import nn
from tqdm.auto import tqdm

from surgical_peft import SurgicalConfig, save_adapter
from surgical_peft.cli import main as cli_main
from surgical_peft.cli.main import build_parser
from surgical_peft.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KILL_DRIVER = ROOT / "tests" / "kill_driver.py"
WEIGHTS, CONFIG, BIN = "adapter_model.safetensors", "adapter_config.json", "adapter_model.bin"
PREFIX = "base_model.model."
STAGE1 = f"{PREFIX}resnet.encoder.stages.0.layers.0.layer.0"
RUNNING_VAR, TRACKED = f"{STAGE1}.normalization.running_var", f"{STAGE1}.normalization.num_batches_tracked"
CONV = f"{STAGE1}.convolution.weight"
KILL_HOOK = "_SURGICAL_PEFT_KILL_AT"
CATEGORIES = {
    "clear error": "clear errors",
    "documented": "documented behaviours",
    "crash": "unhelpful crashes",
    "silent": "silent wrong results",
    "modified": "data loss / modified model",
}
AREAS = {"A": "adapter files on load", "B": "saving", "C": "command line", "D": "training and resume"}
NOT_NAMED = " (does not name the file)"
UNSEALED_VALUES = (
    "docs/guides/safety.md: a file of PEFT's save_pretrained is unsealed (no checksum), and its finite values load as "
    "they are, however large"
)
ANOTHER_METHOD = (
    "docs/guides/safety.md: a config naming another PEFT method is that method's adapter, read by PEFT's code"
)
PEFT_SAVE = (
    "docs/guides/safety.md: PEFT's own save_pretrained raises PEFT's errors (FileNotFoundError for an empty path)"
)
CONFIG_ALONE = (
    "SurgicalConfig.from_pretrained docstring: a directory with the config alone reads as a config (PEFT's config "
    "suite); loading it as an adapter is refused"
)
LOADS_EXACTLY = "docs/method.md 'How it works': a loaded adapter reproduces the tuned model's eval-mode logits to 1e-5"
HEADER_ONLY = (
    "SurgicalConfig.from_pretrained docstring: a config read checks the weights file's header only; the tensors are "
    "checked when the adapter is added to a model"
)
LONGEST_MESSAGE = 2_000  # characters: an error message names a few values and the count, never a million of them
MANY = [f"m{index}" for index in range(1_000_000)]  # module names of no module
torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------------ the harness
@dataclass
class Outcome:
    """How one attempt ended: a key of `CATEGORIES` (or `harness` for a bug of this script) and what happened."""

    category: str
    note: str


@dataclass
class Attempt:
    area: str
    name: str
    run: Callable[[Path], Outcome]
    timeout: float = 60.0


@dataclass
class Fixtures:
    """What every attempt starts from, built once before the attempts fork."""

    root: Path
    sealed: Path  # save_adapter of a stage1 adapter on the seed-0 tiny ResNet
    unsealed: Path  # PEFT's save_pretrained of the same adapter
    pickled: Path  # save_pretrained(safe_serialization=False): adapter_model.bin
    other: Path  # a sealed stage2 adapter, the "default" of the model that load_adapter attacks
    head: Path  # a sealed stage1 adapter with a 3-label classifier in modules_to_save (labels cat, dog, bird)
    model_dir: Path  # a tiny ResNet for the 10 digit classes, saved with save_pretrained (the CLI's --model)
    cache: Path  # the shared --cache-dir of the built-in demo model
    reference: torch.Tensor  # eval logits of the trained stage1 adapter
    other_reference: torch.Tensor  # eval logits of the stage2 adapter
    pixels: torch.Tensor = field(repr=False)


FIX: Fixtures  # set by `prepare`, inherited by every forked attempt


def short(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _child(attempt: Attempt, work: Path, pipe: Any) -> None:
    log = os.open(work / "attempt.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))
    os.chdir(work)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outcome = attempt.run(work)
    except BaseException:  # a bug of the battery itself, never counted as the library's
        outcome = Outcome("harness", short(traceback.format_exc(), 2000))
    pipe.send(outcome)
    pipe.close()
    os._exit(0)


def execute(attempt: Attempt, work: Path) -> Outcome:
    """Run `attempt` in a forked process in `work`; a hang or a dead process is a crash."""
    context = multiprocessing.get_context("fork")
    reader, writer = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(attempt, work, writer), daemon=False)
    process.start()
    writer.close()
    outcome = None
    if reader.poll(attempt.timeout):
        with contextlib.suppress(EOFError):
            outcome = reader.recv()
        if outcome is None:
            process.join(5)
            outcome = Outcome("crash", f"the process died (exit code {process.exitcode}) without a result")
    else:
        outcome = Outcome("crash", f"hang: no result within {attempt.timeout:.0f} s (killed)")
    if process.is_alive():
        process.kill()
    process.join()
    return outcome


# ------------------------------------------------------------------------------------------------- models and files
def build_model(seed: int = 0, arch: str = "basic", **overrides: Any) -> nn.Module:
    """The tests' tiny ResNet (`tests/conftest.py`), its weights drawn from `seed`."""
    sizes = [8, 16] if arch == "basic" else [16, 32]
    config = transformers.ResNetConfig(
        embedding_size=8, hidden_sizes=sizes, depths=[1, 1], layer_type=arch, num_labels=3
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return transformers.ResNetForImageClassification(config).eval()


def train(model: nn.Module, pixels: torch.Tensor, steps: int = 3) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    model.train()
    for _ in range(steps):
        model(pixel_values=pixels, labels=torch.tensor([0, 1, 2, 0])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


@torch.no_grad()
def logits_of(model: nn.Module) -> torch.Tensor:
    model.eval()
    return model(pixel_values=FIX.pixels).logits


def trained(block: str = "stage1", **config: Any) -> Any:
    model = get_peft_model(build_model(), SurgicalConfig(block=block, **config))
    train(model, FIX.pixels)
    return model


def prepare(root: Path) -> None:
    """Build the adapters and models every attempt starts from, and import what the command line imports lazily
    (its commands and strategies), once, before the attempts fork."""
    global FIX
    build_parser()
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1234))
    FIX = Fixtures(
        root,
        root / "sealed",
        root / "unsealed",
        root / "pickled",
        root / "other",
        root / "head",
        root / "model",
        root / "cache",
        torch.empty(0),
        torch.empty(0),
        pixels,
    )
    model = trained()
    FIX.reference = logits_of(model)
    save_adapter(model, FIX.sealed)
    model.save_pretrained(FIX.unsealed)
    model.save_pretrained(FIX.pickled, safe_serialization=False)
    other = trained("stage2")
    FIX.other_reference = logits_of(other)
    save_adapter(other, FIX.other)
    head = build_model()
    head.config.id2label = {0: "cat", 1: "dog", 2: "bird"}
    head = get_peft_model(head, SurgicalConfig(block="stage1", modules_to_save=["classifier"]))
    train(head, FIX.pixels)
    save_adapter(head, FIX.head)
    digits = build_model(num_labels=10)
    digits.config.image_size = 32
    digits.save_pretrained(FIX.model_dir)
    FIX.cache.mkdir()


def edit_config(directory: Path, **changes: Any) -> None:
    values = json.loads((directory / CONFIG).read_text())
    values.update(changes)
    (directory / CONFIG).write_text(json.dumps(values))


def drop_config(directory: Path, name: str) -> None:
    values = json.loads((directory / CONFIG).read_text())
    values.pop(name, None)
    (directory / CONFIG).write_text(json.dumps(values))


def rewrite_weights(directory: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    """Change the tensors of the weights file and write it back unsealed (as PEFT's save_pretrained writes it)."""
    tensors = load_file(directory / WEIGHTS)
    change(tensors)
    save_file(tensors, directory / WEIGHTS, metadata={"format": "pt"})


def header_of(path: Path) -> tuple[int, dict[str, Any]]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length])


def set_byte(path: Path, key: str, byte: int, value: int = 0xFF) -> None:
    """Set byte `byte` of tensor `key`'s data in the safetensors file `path`."""
    length, header = header_of(path)
    data = bytearray(path.read_bytes())
    data[8 + length + header[key]["data_offsets"][0] + byte] = value
    path.write_bytes(bytes(data))


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Change the sealed file's metadata fields, keeping its tensors (and so its checksum) as they are."""
    tensors = load_file(path)
    _, header = header_of(path)
    save_file(tensors, path, metadata={**header["__metadata__"], **changes})


def tree(directory: Path) -> dict[str, bytes | None]:
    """Every entry under `directory`, files with their bytes (what 'untouched' compares)."""
    if not directory.exists():
        return {}
    return {
        str(path.relative_to(directory)): (path.read_bytes() if path.is_file() else None)
        for path in sorted(directory.rglob("*"))
    }


class NoTmpfs(Exception):
    """A tmpfs could not be mounted (the battery runs as root; a container may still forbid mounts)."""


@contextlib.contextmanager
def small_tmpfs(point: Path, size: int) -> Iterator[Callable[[int], None]]:
    """A tmpfs of `size` bytes mounted at `point` (a real file system that fills up); yields `grow(size)`, which
    frees space by remounting it larger. Unmounted on exit."""
    point.mkdir(parents=True, exist_ok=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
    if mount.returncode:
        raise NoTmpfs(mount.stderr.decode().strip())

    def grow(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(point)], check=True, capture_output=True)

    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def unmount_under(directory: Path) -> None:
    """Unmount whatever an attempt killed on a timeout left mounted under `directory`."""
    with contextlib.suppress(OSError):
        points = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
        for point in points:
            if point.startswith(f"{directory}/"):
                subprocess.run(["umount", "-l", point], capture_output=True)


# ------------------------------------------------------------------------------------------------ the model's state
def model_state(model: nn.Module) -> dict[str, Any]:
    """What a user can observe of a model: tensors, trainability flags, hooks, attributes."""
    return {
        "tensors": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "requires_grad": {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        "hooks": {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()},
        "attributes": {name: sorted(vars(module)) for name, module in model.named_modules()},
        "peft": hasattr(model, "peft_config") or any(isinstance(m, BaseTunerLayer) for m in model.modules()),
    }


def state_changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changes = []
    if list(before["tensors"]) != list(after["tensors"]):
        changes.append("the state dict's keys")
    else:
        changed = [k for k, t in before["tensors"].items() if not torch.equal(after["tensors"][k], t)]
        changes += [f"tensor {changed[0]} (+{len(changed) - 1} more)"] if changed else []
    for key in ("requires_grad", "hooks", "attributes"):
        if before[key] != after[key]:
            differing = sorted(
                k for k in before[key].keys() | after[key].keys() if before[key].get(k) != after[key].get(k)
            )
            changes.append(f"{key} of {differing[:2]}")
    if after["peft"] and not before["peft"]:
        changes.append("PEFT left on the base (peft_config or a tuner layer)")
    return changes


def classify_error(error: BaseException, names: list[str]) -> Outcome:
    """The library's `InputError` is a clear error (its note says when it does not name one of `names`, e.g. the
    file); another `ValueError` only if it names one of `names`; anything else is a crash."""
    kind, message = type(error).__name__, str(error)
    if len(message) > LONGEST_MESSAGE:
        return Outcome("crash", f"{kind} with a message of {len(message):,} characters: {short(message)}")
    named = not names or any(name in message for name in names)
    if isinstance(error, InputError):
        return Outcome("clear error", f"{kind}{'' if named else NOT_NAMED}: {short(message)}")
    if isinstance(error, ValueError) and named:
        return Outcome("clear error", f"{kind}: {short(message)}")
    if isinstance(error, ValueError):
        return Outcome(
            "crash", f"{kind} (not the library's InputError) that does not name {names[0]}: {short(message)}"
        )
    return Outcome("crash", f"raw {kind}: {short(message)}")


# ----------------------------------------------------------------------------------------------- A: loading adapters
ENTRY_POINTS = (
    "SurgicalConfig.from_pretrained",
    "PeftConfig.from_pretrained",
    "PeftModel.from_pretrained",
    "load_adapter",
)


@dataclass
class Damage:
    """One way to spoil an adapter directory, and what a correct library does with it."""

    name: str
    apply: Callable[[Path], None]
    expect: str = "refuse"  # "refuse": must raise; "either": raise clearly, or load the adapter's exact values
    source: str = "unsealed"  # "unsealed", "sealed" or "pickled": the adapter it starts from
    kind: str = "config"  # "config" (adapter_config.json) or "weights"
    needs_model: bool = False  # only a check against the model can refuse it (shapes, keys, the base)
    in_data: bool = False  # only reading the tensors finds it (non-finite values, a seal's checksum)
    base: Callable[[], nn.Module] | None = None  # load onto another base (PeftModel.from_pretrained only)
    cite: str = ""  # a documented behaviour when it loads with other values than the adapter's
    config_check: Callable[[Any], str | None] | None = None  # a wrong value in a returned config, or None
    entries: tuple[str, ...] = ENTRY_POINTS
    doubt: str = ""  # appended to the note of a finding this battery is unsure of
    peft_owned: str = ""  # a documented behaviour when PEFT's own code (not the library's) raises on it
    config_alone: str = ""  # a documented behaviour when a config reader returns the config (the adapter is refused)


def _load_config(entry: str, directory: Path, damage: Damage) -> Outcome:
    reader = SurgicalConfig.from_pretrained if entry.startswith("Surgical") else PeftConfig.from_pretrained
    try:
        config = reader(str(directory))
    except BaseException as error:
        return classify_error(error, [str(directory)])
    wrong = damage.config_check(config) if damage.config_check else None
    if wrong:
        return Outcome("silent", f"returned {type(config).__name__} with {wrong}")
    if damage.config_alone:
        return Outcome("documented", f"returned the config ({damage.config_alone})")
    reads_header = entry.startswith("Surgical")
    refusable = not damage.needs_model and not damage.in_data and (damage.kind == "config" or reads_header)
    if damage.expect == "refuse" and refusable:
        return Outcome("silent", f"returned a {type(config).__name__} for a damaged adapter")
    if damage.expect == "refuse":
        why = "the check needs the model" if damage.needs_model else "PEFT's reader reads adapter_config.json only"
        if reads_header and damage.in_data:
            return Outcome("documented", f"returned a config ({HEADER_ONLY}; PeftModel.from_pretrained refuses it)")
        return Outcome(
            "documented",
            f"returned a config ({why}; SurgicalConfig.from_pretrained docstring lists "
            "what a config read checks; PeftModel.from_pretrained refuses it)",
        )
    return Outcome("documented", f"returned a valid {type(config).__name__} (a valid value)")


def _loaded(model: nn.Module, damage: Damage, how: str) -> Outcome:
    """A load that went through: right only if expected and it computes what the adapter was trained to."""
    if damage.expect == "refuse" or damage.base is not None:
        return Outcome("silent", f"{how} loaded a {damage.name!r} adapter without an error")
    difference = (logits_of(model) - FIX.reference).abs().max().item()
    if difference <= 1e-5:
        return Outcome(
            "documented",
            f"loaded; logits equal the tuned model's (max |diff| {difference:.1e}): {damage.cite or LOADS_EXACTLY}",
        )
    if damage.cite:
        return Outcome("documented", f"loaded other values (max |logit diff| {difference:.3g}): {damage.cite}")
    return Outcome("silent", f"loaded, but the logits differ from the tuned model's by {difference:.3g}{damage.doubt}")


def _load_model(directory: Path, damage: Damage) -> Outcome:
    base = damage.base() if damage.base else build_model()
    before = model_state(base)
    try:
        model = PeftModel.from_pretrained(base, str(directory))
    except BaseException as error:
        changes = state_changes(before, model_state(base))
        if changes:
            return Outcome("modified", f"raised {type(error).__name__} but changed the base: {'; '.join(changes)}")
        if damage.peft_owned:
            return Outcome("documented", f"{type(error).__name__}: {short(str(error))}: {damage.peft_owned}")
        return classify_error(error, [] if damage.needs_model and damage.kind != "weights" else [str(directory)])
    return _loaded(model, damage, "PeftModel.from_pretrained")


def _adapter_view(model: Any) -> dict[str, Any]:
    layers = getattr(model.base_model, "surgical_layers", {})
    return {
        "adapters": list(model.peft_config),
        "active": list(model.active_adapters),
        "layers": sorted({name for layer in layers.values() for name in layer.adapters}),
        "logits": logits_of(model),
    }


def _load_adapter(directory: Path, damage: Damage) -> Outcome:
    model = PeftModel.from_pretrained(build_model(), str(FIX.other), is_trainable=True)
    view, state = _adapter_view(model), model_state(model)
    try:
        model.load_adapter(str(directory), adapter_name="x")
    except BaseException as error:
        after = _adapter_view(model)
        changes = [k for k in ("adapters", "active", "layers") if after[k] != view[k]]
        changes += ["the logits"] if not torch.equal(after["logits"], view["logits"]) else []
        changes += state_changes(state, model_state(model))
        if changes:
            return Outcome("modified", f"raised {type(error).__name__} but changed {'; '.join(changes)}")
        if damage.peft_owned:
            return Outcome("documented", f"{type(error).__name__}: {short(str(error))}: {damage.peft_owned}")
        return classify_error(error, [str(directory)])
    model.set_adapter("x")
    return _loaded(model, damage, "load_adapter")


def load_attempt(damage: Damage, entry: str) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        directory = work / "adapter"
        shutil.copytree(getattr(FIX, damage.source), directory)
        damage.apply(directory)
        if entry.endswith("Config.from_pretrained"):
            outcome = _load_config(entry, directory, damage)
        elif entry == "PeftModel.from_pretrained":
            outcome = _load_model(directory, damage)
        else:
            outcome = _load_adapter(directory, damage)
        if (work / "PICKLE_RAN").exists():
            return Outcome("modified", f"a pickle in the adapter ran code (then: {outcome.category}, {outcome.note})")
        return outcome

    return run


def _write(text: str | bytes) -> Callable[[Path], None]:
    def write(directory: Path) -> None:
        path = directory / CONFIG
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)

    return write


def _field_values() -> dict[str, list[tuple[Any, str]]]:
    """Bad (`refuse`) and odd but valid (`either`) values for each field of adapter_config.json."""
    refuse, either = "refuse", "either"
    return {
        "peft_type": [("NOPE", refuse), (123, refuse), (None, refuse), ("LORA", either), ("surgical", refuse)],
        "block": [
            (123, refuse),
            ([], refuse),
            ([1], refuse),
            ({"a": 1}, refuse),
            ("", either),
            ("nope", either),
            ("stage2", either),
            (["stage1", "stage1"], either),
            ("all", either),
            ("auto", either),
            ("x" * 10_000_000, refuse),
            (MANY, refuse),
        ],
        "target_modules": [
            (123, refuse),
            (1.5, refuse),
            (True, refuse),
            ({"a": 1}, refuse),
            ([1, 2], refuse),
            ("([", refuse),
            ("(.+)+Z", either),
            ("", either),
            ([], either),
            (["nope"], either),
            (None, either),
            ("x" * 100_000, either),
            (MANY, refuse),
        ],
        "exclude_modules": [
            (123, refuse),
            ("([", refuse),
            ([1], refuse),
            ("(.+)+Z", either),
            (["resnet.encoder.stages.0"], either),
        ],
        "modules_to_save": [
            ("classifier", refuse),
            (123, refuse),
            ([1], refuse),
            ({}, refuse),
            (["classifier"], either),
            (MANY[:1000], refuse),
        ],
        "delta_dtype": [
            ("float64", refuse),
            ("int8", refuse),
            (123, refuse),
            ("", either),
            ("bfloat16", either),
            ("float16", either),
        ],
        "base_fingerprint": [
            ("garbage", refuse),
            (123, refuse),
            ([], refuse),
            ({}, refuse),
            ({"blocks": "x"}, refuse),
            ({"blocks": {}}, either),
            (None, either),
        ],
        "verify_base": [(False, either), ("no", either), (0, either), (None, either)],
        "auto_criterion": [("nope", refuse), (123, refuse)],
        "auto_top_k": [
            (0, refuse),
            (-1, refuse),
            ("3", refuse),
            (True, refuse),
            (1.5, refuse),
            (float("nan"), refuse),
        ],
        "init_weights": [("yes", refuse), (0, refuse), (None, refuse)],
        "task_type": [("NOPE", either), (123, either)],
        "inference_mode": [("maybe", either)],
        "base_model_name_or_path": [(123, either), ("/no/such/model", either)],
        "revision": [(123, either)],
        "unknown_field": [(1, either)],
    }


def _verify_base_kept(config: Any) -> str | None:
    return (
        None if getattr(config, "verify_base", True) is True else f"verify_base={config.verify_base!r} from the file"
    )


def config_damages() -> list[Damage]:
    damages = []
    for name, values in _field_values().items():
        for value, expect in values:
            check = _verify_base_kept if name == "verify_base" else None
            damages.append(
                Damage(
                    f"{name}={short(repr(value), 40)}",
                    lambda d, n=name, v=value: edit_config(d, **{n: v}),
                    expect,
                    config_check=check,
                    peft_owned=ANOTHER_METHOD if (name, value) == ("peft_type", "LORA") else "",
                )
            )
    damages += [
        Damage("peft_type missing", lambda d: drop_config(d, "peft_type")),
        Damage(
            "block=None, target_modules='(.+)+Z' (catastrophic regex)",
            lambda d: edit_config(d, block=None, target_modules="(.+)+Z"),
            "either",
        ),
        Damage(
            "block=None, target_modules: 1,000,000 names",
            lambda d: edit_config(d, block=None, target_modules=MANY),
        ),
        Damage(
            "block=None, target_modules: 99,999 names of no module beside the tuned one",
            lambda d: edit_config(d, block=None, target_modules=[*MANY[:99_999], "resnet.encoder.stages.0"]),
            "either",
        ),
        Damage(
            "exclude_modules: 99,999 names of no module",
            lambda d: edit_config(d, exclude_modules=MANY[:99_999]),
            "either",
        ),
        Damage(
            "block=None, target_modules='(a|a)*b'",
            lambda d: edit_config(d, block=None, target_modules="(a|a)*b"),
            "either",
        ),
        Damage("invalid JSON", _write('{"peft_type": "SURGICAL",')),
        Damage("a JSON list", _write("[1, 2]")),
        Damage("a JSON string", _write('"SURGICAL"')),
        Damage("JSON null", _write("null")),
        Damage("a JSON number", _write("1e999")),
        Damage("an empty file", _write("")),
        Damage("binary garbage", _write(bytes(range(256)) * 4)),
        Damage("not UTF-8", _write(b'{"peft_type": "SURGICAL\xff\xfe"}')),
        Damage("nested 100,000 deep", _write("[" * 100_000 + "]" * 100_000)),
        Damage(
            "duplicate peft_type, last NOPE",
            lambda d: _write((d / CONFIG).read_text()[:-1] + ', "peft_type": "NOPE"}')(d),
        ),
        Damage("adapter_config.json is a directory", lambda d: ((d / CONFIG).unlink(), (d / CONFIG).mkdir())),
        Damage("adapter_config.json missing", lambda d: (d / CONFIG).unlink()),
        Damage(
            "verify_base=false onto another base",
            lambda d: edit_config(d, verify_base=False),
            needs_model=True,
            base=lambda: build_model(seed=1),
            entries=ENTRY_POINTS[2:3],
        ),
        Damage(
            "base_fingerprint=null onto another base",
            lambda d: edit_config(d, base_fingerprint=None),
            needs_model=True,
            base=lambda: build_model(seed=1),
            entries=ENTRY_POINTS[2:3],
        ),
    ]
    sealed = {
        "block": "stage2",
        "target_modules": ["nope"],
        "base_fingerprint": None,
        "delta_dtype": "float16",
        "modules_to_save": ["classifier"],
        "exclude_modules": ["resnet.encoder.stages.0"],
        "verify_base": False,
    }
    cite = "save_adapter docstring: the sealed weights file's record wins over an edited config (with a warning)"
    for name, value in sealed.items():
        damages.append(
            Damage(
                f"sealed, {name}={value!r}",
                lambda d, n=name, v=value: edit_config(d, **{n: v}),
                "either",
                source="sealed",
                cite=cite,
                config_check=_verify_base_kept,
            )
        )
    return damages


def _first_float(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        def edit(tensors: dict[str, torch.Tensor]) -> None:
            key = min(k for k, t in tensors.items() if t.is_floating_point())
            tensors[key] = change(tensors[key])

        rewrite_weights(directory, edit)

    return apply


def _set_tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    return lambda d: rewrite_weights(d, lambda tensors: tensors.update({key: change(tensors[key])}))


def _truncate(size: Callable[[int], int]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        data = (directory / WEIGHTS).read_bytes()
        (directory / WEIGHTS).write_bytes(data[: size(len(data))])

    return apply


class _Marker:
    """A pickle that creates a file when unpickled: a .bin that runs code on an unrestricted torch.load."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, ("touch PICKLE_RAN",))


def _hostile_bin(directory: Path) -> None:
    (directory / WEIGHTS).unlink()
    torch.save({f"{CONV}": _Marker()}, directory / BIN)


def _write_header(path: Path, header: dict[str, Any], data_bytes: int) -> None:
    """Rewrite `path` as a safetensors file with `header` and `data_bytes` of zeros, left sparse (a hole, as
    `truncate` makes it: no disk space taken)."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with path.open("wb") as file:
        file.write(struct.pack("<Q", len(text)) + text)
    os.truncate(path, 8 + len(text) + data_bytes)


def _announce_8_gb(key: str) -> Callable[[Path], None]:
    """The weights file's header announces `key` as 8.6 GB of float32, the data region sized to match (sparse)."""

    def apply(directory: Path) -> None:
        _, header = header_of(directory / WEIGHTS)
        metadata = header.pop("__metadata__", None)
        header[key] = {"dtype": "F32", "shape": [8, 8, 3, 11_184_811], "data_offsets": [0, 0]}
        end = 0
        for entry in sorted(header.values(), key=lambda entry: entry["data_offsets"][0]):
            size = {"F32": 4, "I64": 8}[entry["dtype"]] * math.prod(entry["shape"])
            entry["data_offsets"], end = [end, end + size], end + size
        _write_header(directory / WEIGHTS, {**header, **({"__metadata__": metadata} if metadata else {})}, end)

    return apply


def _name_twice(directory: Path) -> None:
    """A second entry for CONV after the first, announcing 8.6 GB (a parser that keeps the first name sees a valid
    file, one that keeps the last sees the bomb)."""
    data = (directory / WEIGHTS).read_bytes()
    length, _ = header_of(directory / WEIGHTS)
    entry = json.dumps(
        {"dtype": "F32", "shape": [8, 8, 3, 11_184_811], "data_offsets": [0, 4 * 8 * 8 * 3 * 11_184_811]}
    )
    text = data[8 : 8 + length].rstrip()[:-1] + f', "{CONV}": {entry}}}'.encode()
    text += b" " * (-len(text) % 8)
    (directory / WEIGHTS).write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])


def weights_damages() -> list[Damage]:
    weights = {"kind": "weights"}
    data = {"kind": "weights", "in_data": True}
    model = {"kind": "weights", "needs_model": True}
    unsealed_flip = (
        "docs/guides/safety.md and serialization.py docstring: only save_adapter seals (checksums) the "
        "weights; files written by PEFT's save_pretrained have no checksum and still load"
    )
    return [
        Damage("NaN in a tensor", _first_float(lambda t: t * float("nan")), **data),
        Damage("+inf in a tensor", _first_float(lambda t: torch.full_like(t, float("inf"))), **data),
        Damage(
            "-inf in one value",
            _first_float(lambda t: t.flatten().index_fill(0, torch.tensor([0]), -float("inf")).view_as(t)),
            **data,
        ),
        Damage("NaN in running_var", _set_tensor(RUNNING_VAR, lambda t: t * float("nan")), **data),
        Damage("negative running_var", _set_tensor(RUNNING_VAR, lambda t: t - 100.0), **model),
        Damage(
            "huge finite values (1e38)",
            _first_float(lambda t: torch.full_like(t, 1e38)),
            "either",
            cite=UNSEALED_VALUES,
            **weights,
        ),
        Damage(
            "sealed, a flipped byte in num_batches_tracked",
            lambda d: set_byte(d / WEIGHTS, TRACKED, 2),
            source="sealed",
            **data,
        ),
        Damage(
            "sealed, a flipped byte in a weight",
            lambda d: set_byte(d / WEIGHTS, CONV, 0, 0x01),
            source="sealed",
            **data,
        ),
        Damage(
            "sealed, the checksum edited",
            lambda d: rewrite_metadata(d / WEIGHTS, surgical_tensors_sha256="0" * 64),
            source="sealed",
            **data,
        ),
        Damage(
            "sealed, the record not JSON",
            lambda d: rewrite_metadata(d / WEIGHTS, surgical_config="{"),
            source="sealed",
            **weights,
        ),
        Damage(
            "sealed, the record a list",
            lambda d: rewrite_metadata(d / WEIGHTS, surgical_config="[1]"),
            source="sealed",
            **weights,
        ),
        Damage(
            "sealed, the record's block=123",
            lambda d: rewrite_metadata(d / WEIGHTS, surgical_config='{"block": 123}'),
            source="sealed",
            **weights,
        ),
        Damage(
            "sealed, the record's block=stage2",
            lambda d: rewrite_metadata(d / WEIGHTS, surgical_config='{"block": "stage2", "target_modules": null}'),
            source="sealed",
            **model,
        ),
        Damage(
            "unsealed, a flipped byte in num_batches_tracked",
            lambda d: set_byte(d / WEIGHTS, TRACKED, 2),
            "either",
            cite=unsealed_flip,
            **weights,
        ),
        Damage(
            "unsealed, a flipped low byte in a weight",
            lambda d: set_byte(d / WEIGHTS, CONV, 0, 0x01),
            "either",
            cite=unsealed_flip,
            **weights,
        ),
        Damage("truncated to half", _truncate(lambda n: n // 2), source="sealed", **weights),
        Damage("truncated to 8 bytes", _truncate(lambda n: 8), source="sealed", **weights),
        Damage("truncated by one byte", _truncate(lambda n: n - 1), source="sealed", **weights),
        Damage("an empty weights file", _truncate(lambda n: 0), **weights),
        Damage("random bytes", lambda d: (d / WEIGHTS).write_bytes(os.urandom(4096)), **weights),
        Damage(
            "a header claiming 2**60 bytes",
            lambda d: (d / WEIGHTS).write_bytes(struct.pack("<Q", 2**60) + b"{}"),
            **weights,
        ),
        Damage("a header announcing an 8 GB tensor (a sparse file)", _announce_8_gb(CONV), **model),
        Damage(
            "a header announcing an 8 GB tensor of no module (a sparse file)",
            _announce_8_gb(f"{PREFIX}resnet.nothing.weight"),
            **model,
        ),
        Damage(
            "sealed, a header announcing an 8 GB tensor (a sparse file)",
            _announce_8_gb(CONV),
            source="sealed",
            **model,
        ),
        Damage("a header naming a tensor twice", _name_twice, **weights),
        Damage("weights file missing", lambda d: (d / WEIGHTS).unlink(), config_alone=CONFIG_ALONE, **weights),
        Damage("weights file is a directory", lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).mkdir()), **weights),
        Damage(
            "weights file is /dev/zero",
            lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).symlink_to("/dev/zero")),
            **weights,
        ),
        Damage(
            "weights file a dangling symlink",
            lambda d: ((d / WEIGHTS).unlink(), (d / WEIGHTS).symlink_to(d / "gone")),
            **weights,
        ),
        Damage("only a .bin (safetensors bytes renamed)", lambda d: (d / WEIGHTS).rename(d / BIN), **weights),
        Damage("a .bin that runs code when unpickled", _hostile_bin, **weights),
        Damage(
            "a genuine .bin (save_pretrained(safe_serialization=False))",
            lambda d: None,
            "either",
            source="pickled",
            cite="test_adapter_safety: a pickled adapter loads through the tensors-only unpickler",
            **weights,
        ),
        Damage("a wrong shape (3 values)", _set_tensor(CONV, lambda t: t.flatten()[:3]), **model),
        Damage("a wrong shape (2-D)", _set_tensor(CONV, lambda t: t.reshape(t.shape[0], -1)), **model),
        Damage(
            "an extra key of another block",
            lambda d: rewrite_weights(
                d,
                lambda t: t.update(
                    {f"{PREFIX}resnet.encoder.stages.1.layers.0.layer.0.convolution.weight": torch.zeros(16, 8, 3, 3)}
                ),
            ),
            **model,
        ),
        Damage(
            "an extra key of no module",
            lambda d: rewrite_weights(d, lambda t: t.update({f"{PREFIX}nothing.weight": torch.zeros(2)})),
            **model,
        ),
        Damage("a missing key", lambda d: rewrite_weights(d, lambda t: t.pop(CONV)), **model),
        Damage("every key removed", lambda d: rewrite_weights(d, lambda t: t.clear()), **model),
        Damage("float64 tensor", _set_tensor(CONV, lambda t: t.double()), **model),
        Damage("float16 tensor (delta_dtype None)", _set_tensor(CONV, lambda t: t.half()), **model),
        Damage("int32 tensor", _set_tensor(CONV, lambda t: t.int()), **model),
        Damage("num_batches_tracked as float", _set_tensor(TRACKED, lambda t: t.float()), **model),
        Damage(
            "a good .bin beside a hostile one",
            lambda d: torch.save({f"{CONV}": _Marker()}, d / BIN),
            "either",
            cite="PEFT loads adapter_model.safetensors when it exists",
            **weights,
        ),
    ]


def base_damages() -> list[Damage]:
    only = {"entries": ENTRY_POINTS[2:3], "needs_model": True}
    return [
        Damage("onto another base (seed 1)", lambda d: None, base=lambda: build_model(seed=1), **only),
        Damage("onto a bottleneck ResNet", lambda d: None, base=lambda: build_model(arch="bottleneck"), **only),
        Damage("onto a float64 base", lambda d: None, base=lambda: build_model().double(), **only),
        Damage("onto a bfloat16 base", lambda d: None, base=lambda: build_model().to(torch.bfloat16), **only),
        Damage("onto a base with 5 labels", lambda d: None, base=lambda: build_model(num_labels=5), **only),
        Damage(
            "a 3-label modules_to_save head onto a base with 5 labels",
            lambda d: None,
            source="head",
            base=_five_labels,
            **only,
        ),
        Damage("onto a base with one weight nudged", lambda d: None, base=_nudged_base, **only),
        Damage(
            "sealed, onto another base (seed 1)",
            lambda d: None,
            source="sealed",
            base=lambda: build_model(seed=1),
            **only,
        ),
    ]


def _five_labels() -> nn.Module:
    model = build_model(num_labels=5)
    model.config.id2label = dict(enumerate(["ant", "bee", "cow", "eel", "fox"]))
    return model


def _head_onto_five_labels(work: Path) -> Outcome:
    """load_adapter of the 3-label head adapter into a model of a 5-label base with a head adapter of its own."""
    model = get_peft_model(_five_labels(), SurgicalConfig(block="stage2", modules_to_save=["classifier"]))
    view, state = _adapter_view(model), model_state(model)
    configs = {name: config.to_dict() for name, config in model.peft_config.items()}
    try:
        model.load_adapter(str(FIX.head), adapter_name="x")
    except BaseException as error:
        after = _adapter_view(model)
        changes = [k for k in ("adapters", "active", "layers") if after[k] != view[k]]
        changes += ["the logits"] if not torch.equal(after["logits"], view["logits"]) else []
        changes += state_changes(state, model_state(model))
        changes += ["peft_config"] if {n: c.to_dict() for n, c in model.peft_config.items()} != configs else []
        if changes:
            return Outcome("modified", f"raised {type(error).__name__} but changed {'; '.join(changes)}")
        return classify_error(error, [str(FIX.head)])
    return Outcome("silent", "load_adapter took a 3-label head into a 5-label model without an error")


def _nudged_base() -> nn.Module:
    model = build_model()
    with torch.no_grad():
        model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight[0, 0, 0, 0] += 1e-3
    return model


def _verify_base_false_by_caller(work: Path) -> Outcome:
    model = PeftModel.from_pretrained(build_model(seed=1), str(FIX.unsealed), verify_base=False)
    ok = isinstance(model, PeftModel)
    return Outcome(
        "documented" if ok else "silent",
        "the caller's verify_base=False loads onto another base (docs/guides/safety.md: `verify_base=False` "
        "overrides it)",
    )


def _load_adapter_names() -> list[Attempt]:
    attempts = []
    for name in ("default", "", "a.b", "base_model", "x y"):

        def run(work: Path, name: str = name) -> Outcome:
            model = PeftModel.from_pretrained(build_model(), str(FIX.other), is_trainable=True)
            view = _adapter_view(model)
            try:
                model.load_adapter(str(FIX.sealed), adapter_name=name)
            except BaseException as error:
                after = _adapter_view(model)
                changed = [k for k in ("adapters", "active", "layers") if after[k] != view[k]]
                if changed or not torch.equal(after["logits"], view["logits"]):
                    return Outcome("modified", f"raised {type(error).__name__} but changed {changed or 'the logits'}")
                return classify_error(error, [repr(name), name] if name else ["adapter_name"])
            model.set_adapter(name)
            difference = (logits_of(model) - FIX.reference).abs().max().item()
            if name == "default":
                return Outcome(
                    "silent" if difference > 1e-5 else "documented",
                    f"load_adapter over the existing adapter 'default' replaced it without an error "
                    f"(max |diff| to the loaded adapter {difference:.1e}); PEFT's load_adapter does not "
                    "refuse an existing name (not documented here; unsure whether it should)",
                )
            ok = difference <= 1e-5
            return Outcome("documented" if ok else "silent", f"loaded as {name!r} (max |diff| {difference:.1e})")

        attempts.append(Attempt("A", f"load_adapter with adapter_name={name!r}", run))
    return attempts


def area_a() -> list[Attempt]:
    attempts = []
    for damage in [*config_damages(), *weights_damages(), *base_damages()]:
        for entry in damage.entries:
            name = f"{damage.source} adapter, {damage.name} -> {entry}"
            attempts.append(Attempt("A", name, load_attempt(damage, entry), timeout=60))
    attempts.append(Attempt("A", "verify_base=False by the caller onto another base", _verify_base_false_by_caller))
    attempts.append(
        Attempt("A", "head adapter, a 3-label modules_to_save head -> load_adapter (5 labels)", _head_onto_five_labels)
    )
    return [*attempts, *_load_adapter_names()]


# ------------------------------------------------------------------------------------------------------- B: saving
ADAPTER_FILES = {"README.md", CONFIG, WEIGHTS}
OWN_FILES_ONLY = (
    "docs/guides/safety.md: save_adapter writes only adapter_model.safetensors, adapter_config.json and "
    "README.md into path, touching nothing else there"
)


def user_files(directory: Path) -> dict[str, bytes | None]:
    """A user's files in `directory`: a log and a data folder; returns what `tree` sees."""
    (directory / "data").mkdir(parents=True, exist_ok=True)
    (directory / "train_log.txt").write_text("epoch 1: loss 0.3")
    (directory / "data" / "images.csv").write_text("a.png,0")
    return tree(directory)


def lost(directory: Path, before: dict[str, bytes | None], allowed: set[str] = frozenset()) -> list[str]:
    """The entries of `before` (a user's) that are gone or changed, other than `allowed` names."""
    after = tree(directory)
    return [name for name, data in before.items() if name not in allowed and after.get(name, b"\0gone") != data]


def loads_as(directory: Path) -> tuple[str | None, str]:
    """Which adapter `directory` holds: "A" (the stage1 one), "B" (stage2), None (refused, with the error)."""
    try:
        logits = logits_of(PeftModel.from_pretrained(build_model(), str(directory)))
    except BaseException as error:
        return None, f"{type(error).__name__}: {short(str(error), 160)}"
    for name, reference in (("A", FIX.reference), ("B", FIX.other_reference)):
        if (logits - reference).abs().max().item() <= 1e-5:
            return name, "loads exactly"
    return "mix", "loads, but as neither adapter"


def loaded_model(which: str = "A") -> Any:
    return PeftModel.from_pretrained(build_model(), str(FIX.sealed if which == "A" else FIX.other))


def _save(writer: str, model: Any, target: Any, **kwargs: Any) -> None:
    save_adapter(model, target, **kwargs) if writer == "save_adapter" else model.save_pretrained(target, **kwargs)


def _judge_save(
    directory: Path, saved: Path, before: dict[str, bytes | None], writer: str, allowed: set[str]
) -> Outcome:
    gone = lost(directory, before, allowed)
    if gone:
        return Outcome("modified", f"{writer} removed or changed the user's {gone}")
    which, how = loads_as(saved)
    if which != "A":
        return Outcome("silent", f"saved without an error, but the directory does not load as the adapter: {how}")
    cite = OWN_FILES_ONLY if writer == "save_adapter" else "PEFT's save_pretrained writes its files, nothing else"
    return Outcome("documented", f"saved; the user's files untouched; the adapter loads exactly ({cite})")


def save_into_directory(writer: str, where: str) -> Callable[[Path], Outcome]:
    """Save into a directory with a user's files: a named one, '.', os.getcwd(), a nested missing path."""

    def run(work: Path) -> Outcome:
        directory = work / "project"
        before = user_files(directory)
        if writer == "save_adapter":
            (directory / "README.md").write_text("the user's own README")
        target = {"dir": directory, ".": ".", "cwd": None, "nested": directory / "a" / "b" / "c", "": ""}[where]
        os.chdir(directory)
        target = os.getcwd() if target is None else target
        try:
            _save(writer, loaded_model(), target)
        except BaseException as error:
            if lost(directory, before):
                return Outcome("modified", f"raised {type(error).__name__} and lost the user's files")
            if writer != "save_adapter" and where == "" and isinstance(error, FileNotFoundError):
                return Outcome("documented", f"raised {type(error).__name__}, the user's files kept: {PEFT_SAVE}")
            return classify_error(error, [str(target)])
        saved = directory / "a" / "b" / "c" if where == "nested" else directory
        return _judge_save(directory, saved, before, writer, {"README.md"})

    return run


def save_onto_non_directory(writer: str, target: str) -> Callable[[Path], Outcome]:
    """Save to a regular file, below a regular file, to a symlink to a file, a dangling symlink."""

    def run(work: Path) -> Outcome:
        file = work / "notes.txt"
        file.write_text("the user's notes")
        path = {"file": file, "under a file": file / "adapter", "symlink to a file": work / "link"}.get(target)
        if target == "symlink to a file":
            path.symlink_to(file)
        if target == "dangling symlink":
            path = work / "dangling"
            path.symlink_to(work / "nowhere")
        before = tree(work)
        try:
            _save(writer, loaded_model(), path)
        except BaseException as error:
            after = tree(work)
            if file.read_text() != "the user's notes":
                return Outcome("modified", f"raised {type(error).__name__} and changed the user's file")
            if after != before:
                new = sorted(set(after) - set(before))
                return Outcome("modified", f"raised {type(error).__name__} but left {new} behind")
            return _os_or_value_error(error, [str(path), path.name])
        if target == "dangling symlink":
            which, how = loads_as(path)
            return Outcome(
                "documented" if which == "A" else "silent",
                f"saved through the dangling symlink (its target created); {how}",
            )
        return Outcome("silent", f"{writer} to a {target} went through: {sorted(tree(work))}")

    return run


def _os_or_value_error(error: BaseException, names: list[str]) -> Outcome:
    """Saving: a ValueError, or an OSError of the file system (which names the path), naming the path is clear."""
    if isinstance(error, OSError) and any(name in str(error) for name in names):
        return Outcome("clear error", f"{type(error).__name__}: {short(str(error))}")
    return classify_error(error, names)


def save_read_only(writer: str, missing_child: bool) -> Callable[[Path], Outcome]:
    """Save into a read-only directory (as an unprivileged user: root ignores permissions)."""

    def run(work: Path) -> Outcome:
        directory = work / "readonly"
        before = user_files(directory)
        model = loaded_model()
        target = directory / "adapter" if missing_child else directory
        for path in (directory, directory / "data"):
            path.chmod(0o555)
        os.setegid(65534)
        os.seteuid(65534)
        try:
            _save(writer, model, target)
        except BaseException as error:
            os.seteuid(0)
            os.setegid(0)
            if lost(directory, before) or tree(directory) != before:
                return Outcome("modified", f"raised {type(error).__name__} and changed the directory")
            return _os_or_value_error(error, [str(directory)])
        os.seteuid(0)
        os.setegid(0)
        return Outcome("silent", "saved into a read-only directory without an error (as an unprivileged user)")

    return run


def _save_many(directory: Path, model: Any, times: int) -> None:
    for _ in range(times):
        save_adapter(model, directory)


def save_concurrently(kind: str) -> Callable[[Path], Outcome]:
    """Two writers save different adapters into one directory at once, five times each."""

    def run(work: Path) -> Outcome:
        directory = work / "shared"
        before = user_files(directory)
        errors: list[str] = []
        if kind == "processes":
            pids = []
            for which in "AB":
                pid = os.fork()
                if pid == 0:
                    code = 0
                    try:
                        _save_many(directory, loaded_model(which), 5)
                    except BaseException:
                        traceback.print_exc()
                        code = 1
                    os._exit(code)
                pids.append(pid)
            errors = [f"writer {i} exit {os.waitpid(pid, 0)[1]}" for i, pid in enumerate(pids)]
            errors = [e for e in errors if not e.endswith("exit 0")]
        else:

            def target(model: Any) -> None:
                try:
                    _save_many(directory, model, 5)
                except BaseException as error:
                    errors.append(f"{type(error).__name__}: {short(str(error), 150)}")

            threads = [threading.Thread(target=target, args=(loaded_model(which),)) for which in "AB"]
            [thread.start() for thread in threads]
            [thread.join() for thread in threads]
        if errors:
            return Outcome("crash", f"a writer failed: {errors}")
        gone, which, how = lost(directory, before), *loads_as(directory)
        staging = [p.name for p in directory.iterdir() if p.name.startswith(".surgical-staging")]
        if gone or which not in ("A", "B") or staging:
            return Outcome("modified", f"lost {gone}; the directory {how}; staging left: {staging}")
        return Outcome(
            "documented",
            f"the directory holds adapter {which} exactly, the user's files untouched, no "
            "staging left (files.move_into_place: concurrent writers take turns)",
        )

    return run


def _killed(directory: Path, step: str, model: Any) -> int:
    """save_adapter(model, directory) in a forked process that SIGKILLs itself at `step`; its wait status."""
    pid = os.fork()
    if pid == 0:
        os.environ[KILL_HOOK] = step
        with contextlib.suppress(BaseException):
            save_adapter(model, directory)
        os._exit(0)
    return os.waitpid(pid, 0)[1]


def save_killed(step: str, replacing: bool) -> Callable[[Path], Outcome]:
    """A save killed at `step` while replacing adapter A by B (or writing B into a directory with no adapter)."""

    def run(work: Path) -> Outcome:
        directory = work / "out"
        before = user_files(directory)
        if replacing:
            shutil.copytree(FIX.sealed, directory, dirs_exist_ok=True)
        status = _killed(directory, step, loaded_model("B"))
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL):
            return Outcome("harness", f"the save was not killed at {step!r} (wait status {status})")
        gone, (which, how) = lost(directory, before), loads_as(directory)
        if gone:
            return Outcome("modified", f"the kill lost the user's {gone}")
        if which == "mix":
            return Outcome("silent", "after the kill the directory loads as a mix of the two adapters")
        if replacing and which is None:
            return Outcome("modified", f"after the kill no complete adapter: {how}")
        if which is None and not how.startswith(("InputError", "ValueError")):
            return Outcome("crash", f"after the kill (no adapter yet) loading fails unclearly: {how}")
        save_adapter(loaded_model("B"), directory)
        staging = [p.name for p in directory.iterdir() if p.name.startswith(".surgical-staging")]
        if staging or lost(directory, before) or loads_as(directory)[0] != "B":
            return Outcome("modified", f"the next save left {staging} or did not give adapter B")
        found = f"adapter {which}" if which else f"no adapter yet, refused clearly ({how})"
        return Outcome(
            "documented",
            f"killed at {step!r}: {found}; user's files untouched; the next save cleaned the "
            "staging (save_adapter docstring: a kill leaves the old or the new adapter)",
        )

    return run


def save_broken_model(writer: str, problem: str) -> Callable[[Path], Outcome]:
    """Save an adapter with a NaN in its weights, or float16 deltas that overflow, over a good adapter."""

    def run(work: Path) -> Outcome:
        directory = work / "out"
        shutil.copytree(FIX.sealed, directory)
        before = tree(directory)
        model = PeftModel.from_pretrained(build_model(), str(FIX.sealed), is_trainable=True)
        if problem == "float16 overflow":
            model.peft_config["default"].delta_dtype = "float16"
        weight = model.base_model.model.resnet.encoder.stages[0].layers[0].layer[0].convolution.weight
        with torch.no_grad():
            weight[0, 0, 0, 0] = float("nan") if problem == "NaN" else 1e5
        try:
            _save(writer, model, directory)
        except BaseException as error:
            if tree(directory) != before:
                return Outcome("modified", f"raised {type(error).__name__} but changed the previous adapter")
            return classify_error(error, ["NaN", "overflow", "inf"])
        tensors = load_file(directory / WEIGHTS)
        finite = all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
        return Outcome(
            "silent",
            f"{writer} saved {'finite' if finite else 'non-finite'} deltas of a {problem} model "
            "without an error (docs/guides/safety.md: non-finite deltas and float16 overflow are refused at "
            "save; the previous adapter was replaced)",
        )

    return run


def save_with(
    writer: str, prepare_directory: Callable[[Path], None], model: Any = None, **kwargs: Any
) -> Callable[[Path], Outcome]:
    """Save where the target holds something odd (e.g. a directory named README.md), or with odd arguments."""

    def run(work: Path) -> Outcome:
        directory = work / "out"
        directory.mkdir()
        user_files(directory)
        prepare_directory(directory)
        before = tree(directory)
        try:
            _save(writer, loaded_model() if model is None else model, directory, **kwargs)
        except BaseException as error:
            gone = lost(directory, before)
            if gone:
                return Outcome("modified", f"raised {type(error).__name__} and lost or changed {gone}")
            outcome = _os_or_value_error(error, [str(directory), "safe_serialization", "nope", "PeftModel"])
            new = sorted(set(tree(directory)) - set(before))
            left = f"; left {new}, which {loads_as(directory)[1]}" if new else ""
            return Outcome(outcome.category, outcome.note + left)
        return _judge_save(directory, directory, before, writer, set())

    return run


def _stale_staging(alive: bool) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        directory = work / "out"
        pid = os.getppid() if alive else 2**22 + 7  # a running process, or a pid that does not exist
        stale = directory / f".surgical-staging-{pid}-abc" / "adapter_model.safetensors"
        stale.parent.mkdir(parents=True)
        stale.write_text("half written")
        before = user_files(directory)
        save_adapter(loaded_model(), directory)
        kept = stale.exists()
        if lost(directory, before, {str(stale.relative_to(directory)), stale.parent.name}):
            return Outcome("modified", "lost the user's files")
        right = kept == alive
        return Outcome(
            "documented" if right else ("modified" if alive else "silent"),
            f"{'a live' if alive else 'a dead'} writer's staging {'kept' if kept else 'removed'} "
            "(files.py docstring: the staging of a killed writer is removed by the next one)",
        )

    return run


def _byte_identical(work: Path) -> Outcome:
    model = loaded_model()
    saved = {save_adapter(model, work / str(i)).joinpath(WEIGHTS).read_bytes() for i in range(3)}
    return Outcome(
        "documented" if len(saved) == 1 else "silent",
        f"three saves gave {len(saved)} distinct weights file(s) (test_sealed_saves_are_byte_identical)",
    )


def _readme_dir(directory: Path) -> None:
    (directory / "README.md").mkdir()
    (directory / "README.md" / "mine.txt").write_text("a user's folder named README.md")


def _config_dir(directory: Path) -> None:
    (directory / CONFIG).mkdir()
    (directory / CONFIG / "mine.txt").write_text("a user's folder named adapter_config.json")


def area_b() -> list[Attempt]:
    attempts = []
    for writer in ("save_adapter", "save_pretrained"):
        for where in ("dir", ".", "cwd", "nested", ""):
            attempts.append(
                Attempt(
                    "B",
                    f"{writer} into {where or repr('')} holding a user's files",
                    save_into_directory(writer, where),
                )
            )
        for target in ("file", "under a file", "symlink to a file", "dangling symlink"):
            attempts.append(Attempt("B", f"{writer} to a {target}", save_onto_non_directory(writer, target)))
        for missing in (False, True):
            attempts.append(
                Attempt(
                    "B",
                    f"{writer} into a read-only directory{' (a new child)' * missing}",
                    save_read_only(writer, missing),
                )
            )
        for problem in ("NaN", "float16 overflow"):
            attempts.append(
                Attempt("B", f"{writer} of a model with {problem} over an adapter", save_broken_model(writer, problem))
            )
        attempts.append(
            Attempt("B", f"{writer} where README.md is a user's directory", save_with(writer, _readme_dir))
        )
        attempts.append(
            Attempt(
                "B",
                f"{writer} where adapter_config.json is a user's directory",
                save_with(writer, _config_dir),
            )
        )
        attempts.append(
            Attempt(
                "B",
                f"{writer} selected_adapters=['nope']",
                save_with(writer, lambda d: None, selected_adapters=["nope"]),
            )
        )
    attempts.append(
        Attempt(
            "B",
            "save_adapter safe_serialization=False",
            save_with("save_adapter", lambda d: None, safe_serialization=False),
        )
    )
    plain = save_with("save_adapter", lambda d: None, model=build_model())
    attempts.append(Attempt("B", "save_adapter of a transformers model (not a PeftModel)", plain))
    attempts.append(Attempt("B", "save_pretrained safe_serialization=False (a .bin)", _pickle_save))
    attempts.append(Attempt("B", "save_adapter into a 300-character name", _long_name))
    for kind in ("processes", "threads"):
        attempts.append(Attempt("B", f"two save_adapter at once ({kind})", save_concurrently(kind), timeout=120))
    for step in ("staged", f"after {WEIGHTS}", f"after {CONFIG}", "after README.md"):
        for replacing in (True, False):
            what = "replacing an adapter" if replacing else "into a directory with no adapter"
            attempts.append(Attempt("B", f"save_adapter killed at {step!r}, {what}", save_killed(step, replacing)))
    attempts.append(Attempt("B", "stale staging of a dead writer", _stale_staging(alive=False)))
    attempts.append(Attempt("B", "staging of a live writer", _stale_staging(alive=True)))
    attempts.append(Attempt("B", "three saves of one adapter", _byte_identical))
    attempts.append(Attempt("B", "save_adapter over an adapter on a full disk (tmpfs)", _save_onto_full_tmpfs))
    for writer in ("save_adapter", "save_pretrained"):
        attempts.append(
            Attempt("B", f"{writer} where its files are symlinks to a user's files", _save_onto_links(writer))
        )
    attempts.append(
        Attempt(
            "B", "train where metrics.json, run_args.json and the adapter's files are symlinks", _train_onto_links, 120
        )
    )
    attempts.append(Attempt("B", "rank --json and --plot onto symlinks to a user's files", _rank_onto_links, 120))
    attempts.append(Attempt("B", "predict --output onto a symlink to a user's file", _predict_onto_a_link, 120))
    return attempts


THROUGH_LINKS = (
    "docs/guides/safety.md 'Saving': PEFT's own save_pretrained writes adapter_config.json through a symlink at that "
    "name; save_adapter, and everything the command line writes, replaces it"
)


def _links_to_users_files(directory: Path, names: list[str], work: Path) -> dict[Path, str]:
    """A symlink at each of `names` in `directory` to a user's file outside it; returns the user's files and texts."""
    mine = {}
    for name in names:
        target = work / "mine" / name.replace("/", "-")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(f"the user's {name}")
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).symlink_to(target)
        mine[target] = target.read_text()
    return mine


def _judge_links(
    directory: Path, mine: dict[Path, str], names: list[str], cite: str, through: frozenset[str] = frozenset()
) -> Outcome:
    """The user's files behind the links at `names` must be untouched, except those of `through` (names a writer is
    documented to write through: the note cites `THROUGH_LINKS`), and the other links replaced by files."""
    changed = [path.name for path, text in mine.items() if path.read_text() != text]
    if [name for name in changed if name not in through]:
        return Outcome("modified", f"wrote through the links into the user's {changed}")
    still = [name for name in names if (directory / name).is_symlink() and name not in through]
    if still:
        return Outcome("silent", f"left the links {still} in place of its files")
    if changed:
        return Outcome(
            "documented", f"wrote through the link into the user's {changed}, replaced the others ({THROUGH_LINKS})"
        )
    return Outcome("documented", f"the links replaced by its files, the user's files untouched ({cite})")


def _save_onto_links(writer: str) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        directory = work / "out"
        names = sorted(ADAPTER_FILES)
        mine = _links_to_users_files(directory, names, work)
        _save(writer, loaded_model(), directory)
        if loads_as(directory)[0] != "A":
            return Outcome(
                "silent", f"saved, but the directory does not load as the adapter: {loads_as(directory)[1]}"
            )
        cite = "files.py docstring: a symlink at a name is replaced, never written through"
        return _judge_links(
            directory, mine, names, cite, frozenset({CONFIG}) if writer == "save_pretrained" else frozenset()
        )

    return run


def _train_onto_links(work: Path) -> Outcome:
    output = work / "run"
    names = ["metrics.json", "run_args.json", "adapter/README.md", f"adapter/{CONFIG}", f"adapter/{WEIGHTS}"]
    mine = _links_to_users_files(output, names, work)
    code, escaped, _, stderr = _run_main(_fill(TRAIN, {"model": str(FIX.model_dir), "out": str(output)}))
    if escaped is not None or code != 0:
        return Outcome("crash", f"exit {code}: {short(str(escaped) if escaped else stderr[-300:])}")
    return _judge_links(output, mine, names, "files.write_file docstring: a symlink is replaced, not written through")


def _predict_onto_a_link(work: Path) -> Outcome:
    build_model().save_pretrained(work / "base")  # the base of FIX.sealed
    mine = _links_to_users_files(work, ["predictions.csv"], work)
    argv = ["predict", "--model", str(work / "base"), "--adapter", str(FIX.sealed), "--output"]
    code, escaped, _, stderr = _run_main(
        [*argv, str(work / "predictions.csv"), image_folder(work / "images", ("a", "b"))]
    )
    if escaped is not None or code != 0:
        return Outcome("crash", f"exit {code}: {short(str(escaped) if escaped else stderr[-300:])}")
    cite = "cli/commands/predict.py: the CSV is written by files.write_file, a symlink replaced"
    return _judge_links(work, mine, ["predictions.csv"], cite)


def _rank_onto_links(work: Path) -> Outcome:
    names = ["scores.json", "plot.png"]
    mine = _links_to_users_files(work, names, work)
    argv = _fill(
        [*RANK, "--json", str(work / "scores.json"), "--plot", str(work / "plot.png")], {"model": str(FIX.model_dir)}
    )
    code, escaped, _, stderr = _run_main(argv)
    if escaped is not None or code != 0:
        return Outcome("crash", f"exit {code}: {short(str(escaped) if escaped else stderr[-300:])}")
    return _judge_links(work, mine, names, "files.write_file docstring: a symlink is replaced, not written through")


def _save_onto_full_tmpfs(work: Path) -> Outcome:
    """save_adapter of adapter B over adapter A on a tmpfs with 12 kB left (B's weights alone are 18 kB)."""
    disk = work / "disk"
    try:
        with small_tmpfs(disk, 256 * 1024):
            directory = disk / "adapter"
            shutil.copytree(FIX.sealed, directory)
            before = user_files(directory)
            (disk / "filler").write_bytes(b"x" * (shutil.disk_usage(disk).free - 12_000))
            try:
                save_adapter(loaded_model("B"), directory)
            except BaseException as error:
                if tree(directory) != before:
                    return Outcome("modified", f"raised {type(error).__name__} and changed the directory")
                if isinstance(error, OSError) and error.errno == errno.ENOSPC and str(directory) in str(error):
                    return Outcome("clear error", f"OSError: {short(str(error))}; adapter A and the user's files kept")
                return classify_error(error, [str(directory)])
            return Outcome("harness", "the save fit on the disk: nothing was attacked")
    except NoTmpfs as error:
        return Outcome("harness", f"cannot mount a tmpfs: {error}")


def _pickle_save(work: Path) -> Outcome:
    directory = work / "out"
    before = user_files(directory)
    loaded_model().save_pretrained(directory, safe_serialization=False)
    if lost(directory, before):
        return Outcome("modified", "lost the user's files")
    which, how = loads_as(directory)
    return Outcome(
        "documented" if which == "A" else "silent",
        f"wrote adapter_model.bin; {how} (docs/guides/safety.md: "
        "PEFT's own save_pretrained writes the files unsealed; tests: a .bin loads tensors-only)",
    )


def _long_name(work: Path) -> Outcome:
    target = work / ("a" * 300)
    try:
        save_adapter(loaded_model(), target)
    except BaseException as error:
        if sorted(p.name for p in work.iterdir() if p.name != "attempt.log"):
            return Outcome("modified", f"raised {type(error).__name__} and left files behind")
        return _os_or_value_error(error, ["a" * 50])
    return Outcome("silent", "saved into a 300-character name (longer than the file system allows?)")


# ------------------------------------------------------------------------------------------------ C: command line
TRAIN = [
    "train",
    "--model",
    "{model}",
    "--block",
    "stage2",
    "--shift",
    "none",
    "--train-n",
    "30",
    "--eval-n",
    "20",
    "--epochs",
    "1",
    "--batch-size",
    "10",
    "--no-progress",
    "--output-dir",
    "{out}",
]
RANK = ["rank", "{model}", "digits", "--shift", "none", "--train-n", "30", "--num-batches", "1", "--batch-size", "10"]
HUGE_INT, HUGE_FLOAT = str(10**12), "1e308"
RAN = "a valid value: the run finished and saved a finite adapter (docs/guides/training.md 'What a run does')"


def image_folder(root: Path, classes: tuple[str, ...], *, extra: Callable[[Path], None] | None = None) -> str:
    """An imagefolder dataset of 12 small PNG images per class; `extra(root)` adds what the attempt needs."""
    from PIL import Image

    for index, label in enumerate(classes):
        (root / label).mkdir(parents=True)
        for row in range(12):
            Image.new("RGB", (16, 16), (40 + 20 * index, row * 10, 0)).save(root / label / f"{row}.png")
    if extra is not None:
        extra(root)
    return str(root)


@dataclass
class Cli:
    """One command line: `{model}`, `{out}`, `{work}`, `{cache}` and the `folders` keys are filled in at run time."""

    argv: list[str]
    expect: str = "refuse"  # "refuse", "either" (a valid run or a clear refusal), "stop" (a training error)
    folders: dict[str, Callable[[Path], str]] = field(default_factory=dict)
    files: Callable[[Path], None] | None = None  # prepares the output directory (e.g. a previous run)
    output_exists: bool = True
    names: tuple[str, ...] = ()  # what a refusal's message must name (the cause, the fix), or it is unhelpful


def _fill(argv: list[str], values: dict[str, str]) -> list[str]:
    return [re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], m[0]), arg) for arg in argv]


def _run_main(argv: list[str]) -> tuple[int | None, BaseException | None, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code, escaped = None, None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli_main(argv)
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException as error:
            escaped = error
            traceback.print_exc(file=err)
    return code, escaped, out.getvalue(), err.getvalue()


def _finite_adapter(out: Path) -> bool:
    path = out / "adapter" / WEIGHTS
    return path.is_file() and all(
        bool(torch.isfinite(t).all()) for t in load_file(path).values() if t.is_floating_point()
    )


def _kept_checkpoints(out: Path) -> list[str | None]:
    """The complete checkpoints in `out`, each as `phase epoch` if every epoch it records has a finite loss, else
    None (README: a non-finite loss saves nothing of that epoch; earlier epochs' checkpoints stay)."""
    kept: list[str | None] = []
    for progress in sorted((out / "checkpoints").glob("checkpoint_*/progress.json")):
        history = json.loads(progress.read_text())["history"]
        finite = all(math.isfinite(record.get("train_loss", math.nan)) for record in history)
        kept.append(f"{progress.parent.name}: {history[-1]['phase']} epoch {history[-1]['epoch']}" if finite else None)
    return kept


def judge_cli(spec: Cli, result: tuple[Any, ...], out: Path, befores: dict[Path, dict[str, Any]]) -> Outcome:
    code, escaped, stdout, stderr = result
    if escaped is not None:
        return Outcome("crash", f"{type(escaped).__name__} escaped main: {short(str(escaped), 200)}")
    if "Traceback (most recent call last)" in stderr:
        return Outcome("crash", f"exit {code} with a traceback: {short(stderr[-300:])}")
    gone = [f"{d.name}/{n}" for d, before in befores.items() for n in lost(d, before)]
    if gone:
        return Outcome("modified", f"exit {code}; the user's {gone} gone or changed")
    lines = [line for line in stderr.splitlines() if "error:" in line]
    if code == 0:
        if spec.expect in ("refuse", "stop"):
            return Outcome(
                "silent", f"exit 0 for a bad value: {short(stdout.strip().splitlines()[-1] if stdout.strip() else '')}"
            )
        if spec.argv[0] == "train" and not _finite_adapter(out):
            return Outcome("silent", "exit 0 but no finite adapter saved")
        return Outcome("documented", RAN if spec.argv[0] == "train" else "a valid value: it ran (exit 0)")
    if code != 2 or not lines:
        return Outcome("crash", f"exit {code} without a one-line error: {short(stderr[-300:])}")
    missing = [name for name in spec.names if name not in lines[-1]]
    if missing:
        return Outcome("crash", f"exit 2, but the message does not name {missing}: {short(lines[-1], 250)}")
    after_training = any(text in lines[-1] for text in ("Training stopped", "was not saved"))
    allowed = {"checkpoints"} if after_training else set()
    new = [
        f"{d.name}/{n}"
        for d, before in befores.items()
        for n in sorted(set(tree(d)) - set(before))
        if n.split("/")[0] not in allowed
    ]
    if new:
        return Outcome("modified", f"refused ({short(lines[-1], 150)}) but left {new[:4]}")
    if after_training and (out / "adapter").exists():
        return Outcome("modified", "training stopped but an adapter was saved")
    kept = _kept_checkpoints(out) if after_training else []
    if None in kept:
        return Outcome("modified", "training stopped but a checkpoint of a non-finite epoch was saved")
    kind = "argparse" if stderr.lstrip().startswith("usage:") else f"{len(lines)} error line(s)"
    left = "; no adapter" if after_training else ""
    left += f" and the complete checkpoint of the finite epoch(s) before it ({', '.join(kept)})" if kept else ""
    return Outcome("clear error", f"exit 2 ({kind}): {short(lines[-1], 250)}{left}")


def cli_attempt(spec: Cli) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        out, cwd = work / "run", work / "cwd"
        cwd.mkdir()
        (cwd / "mine.txt").write_text("the user's file in the working directory")
        if spec.output_exists:
            out.mkdir()
            (out / "notes.txt").write_text("the user's notes in the output directory")
        if spec.files is not None:
            spec.files(out)
        values = {"model": str(FIX.model_dir), "out": str(out), "work": str(work), "cache": str(FIX.cache)}
        values.update({key: make(work) for key, make in spec.folders.items()})
        befores = {out: tree(out), cwd: tree(cwd)}
        os.chdir(cwd)
        return judge_cli(spec, _run_main(_fill(spec.argv, values)), out, befores)

    return run


def _numbers(
    options: dict[str, tuple[str, dict[str, str]]], base: list[str], extra: dict[str, list[str]]
) -> list[tuple[str, Cli]]:
    """`options`: option -> (int|float, {value: expect}); every bad value of every numeric option."""
    specs = []
    for option, (kind, expects) in options.items():
        values = dict.fromkeys(("-1", "0", "nan", "inf", "huge"), "refuse")
        values.update(expects)
        for value, expect in values.items():
            if expect == "skip":
                continue
            text = {"huge": HUGE_FLOAT if kind == "float" else HUGE_INT}.get(value, value)
            specs.append((f"{base[0]} {option} {text}", Cli([*base, *extra.get(option, []), option, text], expect)))
    return specs


DP = ["--strategy", "dp-linear-probe", "--block", "head", "--epsilon", "1"]
TRAIN_NUMBERS = {
    "--epochs": ("int", {"huge": "skip"}),  # huge: a legitimately endless run, not attempted
    "--lp-epochs": ("int", {"huge": "skip"}),
    "--batch-size": ("int", {"huge": "either"}),
    "--gradient-accumulation-steps": ("int", {"huge": "either"}),
    "--train-n": ("int", {}),
    "--eval-n": ("int", {"0": "either", "huge": "either"}),
    "--seed": ("int", {"0": "skip"}),  # 0: the default, a plain valid run
    "--severity": ("int", {}),
    "--pca-dim": ("int", {}),
    "--dp-steps": ("int", {"huge": "skip"}),
    "--lr": ("float", {"huge": "stop"}),
    "--lr-decay": ("float", {}),
    "--weight-decay": ("float", {"0": "skip", "huge": "either"}),  # 0: the default
    "--epsilon": ("float", {"huge": "either"}),
    "--delta": ("float", {}),
    "--dp-lr": ("float", {"huge": "either"}),
    "--clipping-norm": ("float", {"huge": "either"}),
}
TRAIN_EXTRA = {
    "--lp-epochs": ["--strategy", "lp-ft"],
    "--severity": ["--shift", "fog"],
    "--pca-dim": DP,
    "--dp-steps": DP,
    "--epsilon": DP[:4],
    "--delta": DP,
    "--dp-lr": DP,
    "--clipping-norm": DP,
}
RANK_NUMBERS = {
    "--num-batches": ("int", {"huge": "either"}),
    "--batch-size": ("int", {"huge": "either"}),
    "--train-n": ("int", {}),
    "--seed": ("int", {"0": "skip", "huge": "either"}),  # 0: the default; torch seeds take 64 bits
    "--severity": ("int", {}),
    "--image-size": ("int", {}),
    "--epochs": ("int", {"huge": "skip"}),
    "--learning-rate": ("float", {"huge": "either"}),
    "--greedy-threshold": ("float", {"0": "skip"}),  # 0: the default
}
RANK_EXTRA = {
    "--severity": ["--shift", "fog"],
    "--epochs": ["--criterion", "sweep"],
    "--learning-rate": ["--criterion", "sweep", "--epochs", "1"],
    "--greedy-threshold": ["--criterion", "greedy", "--epochs", "1"],
}


def _broken_png(root: Path) -> None:
    (root / "b" / "broken.png").write_bytes(b"not an image")


def _empty_png(root: Path) -> None:
    (root / "b" / "empty.png").write_bytes(b"")


def _truncated_png(root: Path) -> None:
    data = (root / "a" / "0.png").read_bytes()
    (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])


def _odd_images(root: Path) -> None:
    from PIL import Image

    Image.new("L", (16, 16), 100).save(root / "a" / "gray.png")
    Image.new("RGBA", (16, 16), (1, 2, 3, 4)).save(root / "b" / "alpha.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(root / "a" / "tiny.png")
    Image.new("RGB", (300, 40), (9, 9, 9)).save(root / "b" / "wide.jpg")


def _text_file(root: Path) -> None:
    (root / "a" / "notes.txt").write_text("not an image, not an image extension")


def _loop(root: Path) -> None:
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)


def _model_variants(kind: str) -> Callable[[Path], str]:
    def make(work: Path) -> str:
        path = work / f"model-{kind}"
        if kind == "file":
            path.write_text("not a model")
        elif kind == "empty":
            path.mkdir()
        elif kind == "bad-config":
            shutil.copytree(FIX.model_dir, path)
            (path / "config.json").write_text("{not json")
        elif kind == "no-weights":
            shutil.copytree(FIX.model_dir, path)
            for weights in path.glob("*.safetensors"):
                weights.unlink()
        return str(path)

    return make


def _folder(classes: tuple[str, ...], extra: Callable[[Path], None] | None = None) -> Callable[[Path], str]:
    return lambda work: image_folder(work / "images", classes, extra=extra)


def _cli_specs() -> list[tuple[str, Cli]]:
    folder = {"images": _folder(("a", "b"))}
    specs = [*_numbers(TRAIN_NUMBERS, TRAIN, TRAIN_EXTRA), *_numbers(RANK_NUMBERS, RANK, RANK_EXTRA)]
    for option, value in [
        ("--shift", "nope"),
        ("--strategy", "nope"),
        ("--block", "nope"),
        ("--block", ""),
        ("--mixed-precision", "nope"),
        ("--mixed-precision", "fp16"),
        ("--delta-dtype", "nope"),
        ("--delta-dtype", "float64"),
        ("--lr-mode", "nope"),
        ("--split", "nope"),
        ("--label-column", "nope"),
        ("--image-column", "nope"),
        ("--hub-model-id", "x"),
    ]:
        specs.append(
            (
                f"train {option} {value!r}",
                Cli([*TRAIN, option, value], "either" if option == "--hub-model-id" else "refuse"),
            )
        )
    specs += [
        ("train --mixed-precision bf16 (CPU)", Cli([*TRAIN, "--mixed-precision", "bf16"], "either")),
        ("train --block all --block stage1", Cli([*TRAIN, "--block", "all", "--block", "stage1"])),
        ("train --strategy alternate with one block", Cli([*TRAIN, "--strategy", "alternate"])),
        ("train --strategy gradual --epochs 1", Cli([*TRAIN, "--strategy", "gradual"])),
        ("train --lr-decay 0.5 --lr-mode rgn", Cli([*TRAIN, "--lr-decay", "0.5", "--lr-mode", "rgn"])),
        ("train dp-linear-probe without --epsilon", Cli([*TRAIN, "--strategy", "dp-linear-probe", "--block", "head"])),
        ("train --epsilon 1 with --strategy surgical", Cli([*TRAIN, "--epsilon", "1"])),
        ("train --pca-dim 4 with --strategy surgical", Cli([*TRAIN, "--pca-dim", "4"])),
        ("train dp-surgical on a BatchNorm block", Cli([*TRAIN, "--strategy", "dp-surgical", "--epsilon", "1"])),
        (
            "train --push-to-hub --hub-model-id 'bad id!!'",
            Cli([*TRAIN, "--push-to-hub", "--hub-model-id", "bad id!!"]),
        ),
        ("train --model /no/such/model", Cli([*TRAIN, "--model", "/no/such/model"])),
        ("train --model no-such-org/no-such-model (offline)", Cli([*TRAIN, "--model", "no-such-org/no-such-model"])),
        ("rank MODEL /no/such/model", Cli(["rank", "/no/such/model", "digits"])),
        ("rank DATA /no/such/data", Cli([*RANK[:2], "/no/such/data", *RANK[3:]])),
        ("train --dataset /no/such/data", Cli([*TRAIN, "--dataset", "/no/such/data"])),
        ("train --dataset no-such-org/no-such-data (offline)", Cli([*TRAIN, "--dataset", "no-such-org/no-such-data"])),
        ("blocks /no/such/model", Cli(["blocks", "/no/such/model"])),
        ("no command", Cli([])),
        ("train --unknown-option", Cli([*TRAIN, "--unknown-option"])),
    ]
    for kind in ("file", "empty", "bad-config", "no-weights"):
        specs.append((f"train --model: {kind}", Cli([*TRAIN, "--model", "{m}"], folders={"m": _model_variants(kind)})))
        specs.append((f"rank MODEL: {kind}", Cli(["rank", "{m}", "digits"], folders={"m": _model_variants(kind)})))
    specs += [
        ("train --dataset: a file", Cli([*TRAIN, "--dataset", "{work}/attempt.log"])),
        (
            "train --dataset: an empty directory",
            Cli([*TRAIN, "--dataset", "{d}"], folders={"d": lambda w: (w / "d").mkdir() or str(w / "d")}),
        ),
        ("train --output-dir: a file", Cli([*TRAIN, "--output-dir", "{out}/notes.txt"])),
        ("train --output-dir: below a file", Cli([*TRAIN, "--output-dir", "{out}/notes.txt/run"])),
        ("train --output-dir: not yet there, refused run", Cli([*TRAIN, "--lr", "nan"], output_exists=False)),
        (
            "train imagefolder: a corrupt image",
            Cli([*TRAIN, "--dataset", "{images}"], folders={"images": _folder(("a", "b"), _broken_png)}),
        ),
        (
            "train imagefolder: a zero-byte image",
            Cli([*TRAIN, "--dataset", "{images}"], folders={"images": _folder(("a", "b"), _empty_png)}),
        ),
        (
            "train imagefolder: a truncated PNG",
            Cli(
                [*TRAIN, "--dataset", "{images}", "--train-n", "6", "--eval-n", "6"],
                "either",
                folders={"images": _folder(("a", "b"), _truncated_png)},
            ),
        ),
        (
            "train imagefolder: a corrupt image, --skip-unreadable-images",
            Cli(
                [*TRAIN, "--dataset", "{images}", "--train-n", "6", "--eval-n", "6", "--skip-unreadable-images"],
                "either",
                folders={"images": _folder(("a", "b"), _broken_png)},
            ),
        ),
        (
            "train imagefolder: a single class",
            Cli([*TRAIN, "--dataset", "{images}"], folders={"images": _folder(("a",))}),
        ),
        (
            "train imagefolder: --image-column wrong",
            Cli([*TRAIN, "--dataset", "{images}", "--image-column", "img"], folders=folder),
        ),
        (
            "train imagefolder: --label-column wrong",
            Cli([*TRAIN, "--dataset", "{images}", "--label-column", "lab"], folders=folder),
        ),
        (
            "train imagefolder: --train-n beyond the data",
            Cli([*TRAIN, "--dataset", "{images}", "--train-n", "100"], folders=folder),
        ),
        (
            "train imagefolder: gray, RGBA, 1x1 and wide images",
            Cli(
                [*TRAIN, "--dataset", "{images}", "--train-n", "6", "--eval-n", "6"],
                "either",
                folders={"images": _folder(("a", "b"), _odd_images)},
            ),
        ),
        (
            "train imagefolder: a text file among the images",
            Cli(
                [*TRAIN, "--dataset", "{images}", "--train-n", "6", "--eval-n", "6"],
                "either",
                folders={"images": _folder(("a", "b"), _text_file)},
            ),
        ),
        (
            "train imagefolder: a symlink loop",
            Cli(
                [*TRAIN, "--dataset", "{images}", "--train-n", "6", "--eval-n", "6"],
                "either",
                folders={"images": _folder(("a", "b"), _loop)},
            ),
        ),
        ("rank DATA: a single class", Cli([*RANK[:2], "{images}", *RANK[3:]], folders={"images": _folder(("a",))})),
        (
            "rank DATA: 11 classes for a 10-label head",
            Cli([*RANK[:2], "{images}", *RANK[3:6], "6"], folders={"images": _folder(tuple("abcdefghijk"))}),
        ),
        ("rank --plot into a missing directory", Cli([*RANK, "--plot", "{work}/no/such/dir/r.png"], "either")),
        ("rank --json onto a directory", Cli([*RANK, "--json", "{work}"], "either")),
        ("rank --criterion nope", Cli([*RANK, "--criterion", "nope"])),
        ("rank --shift nope", Cli([*RANK, "--shift", "nope"])),
        (
            "train demo model: --lr nan (shared --cache-dir)",
            Cli(["train", *TRAIN[3:], "--cache-dir", "{cache}", "--lr", "nan"]),
        ),
        ("train demo model: --block nope", Cli(["train", *TRAIN[3:], "--cache-dir", "{cache}", "--block", "nope"])),
        ("train demo model: --cache-dir a file", Cli(["train", *TRAIN[3:], "--cache-dir", "{out}/notes.txt"])),
        (
            "train demo model: a valid run (pretrains once)",
            Cli(["train", *TRAIN[3:], "--cache-dir", "{cache}"], "either"),
        ),
        (
            "rank demo-resnet digits (cached)",
            Cli(["rank", "demo-resnet", *RANK[2:], "--cache-dir", "{cache}"], "either"),
        ),
    ]
    return [*specs, *_batch_of_one_specs(), *_wide_image_specs()]


ONE_BY_ONE = [*TRAIN, "--image-size", "8"]  # the tiny ResNet's stage2 (a BatchNorm block) sees 1x1 maps at 8 px
BATCH_OF_ONE = ("BatchNorm", "batches of one")


def _batch_of_one_specs() -> list[tuple[str, Cli]]:
    """Issue 26, finding 13: batches of one image where a BatchNorm layer trains."""
    return [
        (
            "train --train-n 1 with a tuned BatchNorm",
            Cli([*ONE_BY_ONE, "--train-n", "1"], names=(*BATCH_OF_ONE, "--train-n")),
        ),
        (
            "train --batch-size 1 with a tuned BatchNorm",
            Cli([*ONE_BY_ONE, "--batch-size", "1"], names=(*BATCH_OF_ONE, "--batch-size")),
        ),
        ("train: a last batch of one with a tuned BatchNorm", Cli([*ONE_BY_ONE, "--train-n", "21"], "either")),
        (
            "train --train-n 1 --block head (no BatchNorm trains)",
            Cli([*TRAIN[:3], *TRAIN[5:], "--block", "head", "--train-n", "1"], "either"),
        ),
    ]


GRADIENT = [[8 * (row + column) for column in range(16)] for row in range(16)]  # 0 to 240: 31 distinct values


def _wide_image(mode: str, scale: float, offset: int) -> Any:
    """GRADIENT plus `offset` (at most 255) as a PIL image of `mode`, its values multiplied by `scale`."""
    import numpy as np
    from PIL import Image

    values = np.minimum(np.array(GRADIENT) + offset, 255) * scale
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    return Image.fromarray(values.astype(dtype))


def _wide_folder(mode: str, suffix: str, scale: float, odd: float | None = None) -> Callable[[Path], str]:
    """Two classes of 12 images of `mode` at `scale` (`odd`: one more image at that scale, out of range)."""

    def make(work: Path) -> str:
        root = work / "wide"
        for label in ("a", "b"):
            (root / label).mkdir(parents=True)
            for row in range(12):
                _wide_image(mode, scale, row + 7 * (label == "b")).save(root / label / f"{row}{suffix}")
        if odd is not None:
            _wide_image(mode, odd, 0).save(root / "b" / f"odd{suffix}")
        return str(root)

    return make


def _wide_image_specs() -> list[tuple[str, Cli]]:
    """Issue 26, finding 11: 32-bit images with no scale the library can know are refused, naming file and mode."""
    wide = [*TRAIN, "--dataset", "{wide}", "--train-n", "12", "--eval-n", "6"]
    return [
        (
            "train imagefolder: a float TIFF with values to 960",
            Cli(wide, folders={"wide": _wide_folder("F", ".tif", 1 / 255, odd=4.0)}, names=("odd.tif", "mode F")),
        ),
        (
            "train imagefolder: a 32-bit integer TIFF beyond 16 bits",
            Cli(wide, folders={"wide": _wide_folder("I", ".tif", 257, odd=65536)}, names=("odd.tif", "mode I")),
        ),
    ]


def _read_at_scale(mode: str, suffix: str, scale: float) -> Callable[[Path], Outcome]:
    """Issue 26, finding 11: a folder of 16-bit PNGs, 32-bit integer or float TIFFs trains, and its images reach the
    model as the 8-bit images they hold would (PIL's convert('RGB') clipped them to two or three values)."""

    def run(work: Path) -> Outcome:
        import numpy as np
        from PIL import Image

        from surgical_peft.experiments.data import image_transform, load_image_dataset

        folder = _wide_folder(mode, suffix, scale)(work)
        argv = [*TRAIN, "--dataset", folder, "--train-n", "12", "--eval-n", "6"]
        code, escaped, _, stderr = _run_main(_fill(argv, {"model": str(FIX.model_dir), "out": str(work / "run")}))
        if escaped is not None or code != 0:
            return Outcome("crash", f"exit {code}: {short(str(escaped) if escaped else stderr[-300:])}")
        image = load_image_dataset(folder)[0]["image"]
        eight_bit = Image.fromarray(
            np.clip(np.rint(np.asarray(image, dtype=np.float64) / scale), 0, 255).astype(np.uint8)
        )
        transform = image_transform(image_size=16)
        seen, expected = (transform({"image": [i], "label": [0]})["pixel_values"] for i in (image, eight_bit))
        distinct = len(torch.unique(seen))
        if not torch.allclose(seen, expected, atol=1e-5):
            return Outcome("silent", f"trained, but the {mode} images reach the model as {distinct} distinct values")
        return Outcome(
            "documented",
            f"trained; a {mode} image reaches the model as its 8-bit picture ({distinct} distinct values; "
            "experiments/images.py docstring: each mode at its own scale)",
        )

    return run


def _nested_class_folders(work: Path) -> Outcome:
    """Issue 26, finding 12: class folders with subfolders (cat/left, cat/right, dog/left, dog/right)."""
    from PIL import Image

    root = work / "nested"
    for index, label in enumerate(("cat", "dog")):
        for side in ("left", "right"):
            (root / label / side).mkdir(parents=True)
            for row in range(8):
                Image.new("RGB", (16, 16), (40 + 150 * index, 10 * row, 0)).save(root / label / side / f"{row}.png")
    argv = _fill([*TRAIN, "--dataset", str(root), "--train-n", "12", "--eval-n", "8"],
                 {"model": str(FIX.model_dir), "out": str(work / "run")})  # fmt: skip
    code, escaped, _, stderr = _run_main(argv)
    if escaped is not None or code != 0:
        return Outcome("crash", f"exit {code}: {short(str(escaped) if escaped else stderr[-300:])}")
    labels = json.loads((work / "run" / "metrics.json").read_text())["labels"]
    if labels != ["cat", "dog"]:
        return Outcome("silent", f"trained on the labels {labels}, not the class folders cat and dog")
    return Outcome(
        "documented",
        "trained on the class folders cat and dog, with a warning naming the layout (load_image_dataset docstring: "
        "a class folder's images may sit in subfolders of it)",
    )


def area_c() -> list[Attempt]:
    attempts = [Attempt("C", name, cli_attempt(spec), timeout=90) for name, spec in _cli_specs()]
    for mode, suffix, scale in (("I;16", ".png", 257), ("I", ".tif", 257), ("F", ".tif", 1 / 255)):
        attempts.append(
            Attempt("C", f"train imagefolder: {mode} images ({suffix})", _read_at_scale(mode, suffix, scale), 90)
        )
    attempts.append(Attempt("C", "train imagefolder: class folders with subfolders", _nested_class_folders, 90))
    return attempts


# --------------------------------------------------------------------------------------------- D: training, resume
def resume_argv(output: Path, epochs: int, *extra: str) -> list[str]:
    argv = ["train", "--model", str(FIX.model_dir), "--block", "stage2", "--train-n", "30", "--eval-n", "20"]
    argv += ["--batch-size", "10", "--lr", "0.01", "--no-progress", "--epochs", str(epochs)]
    return [*argv, "--output-dir", str(output), *extra]


def identical(output: Path) -> list[str]:
    """The tensors (and history) of `output`'s adapter that differ from the uninterrupted reference run's."""
    reference = FIX.root / "reference" / "run"
    if not (output / "adapter" / WEIGHTS).is_file():
        return ["(no adapter)"]
    tensors, expected = load_file(output / "adapter" / WEIGHTS), load_file(reference / "adapter" / WEIGHTS)
    differ = sorted(set(tensors) ^ set(expected)) + [
        k for k in expected if k in tensors and not torch.equal(tensors[k], expected[k])
    ]
    history = json.loads((output / "metrics.json").read_text())["history"]
    return differ + (["history"] if history != json.loads((reference / "metrics.json").read_text())["history"] else [])


def _reference(work: Path) -> Outcome:
    code = _run_main(resume_argv(FIX.root / "reference" / "run", 2))[0]
    return Outcome("documented" if code == 0 else "harness", f"the uninterrupted 2-epoch run: exit {code}")


def _resume_with_stray(strays: dict[str, str]) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        output = work / "run"
        for name, text in strays.items():
            (output / "checkpoints" / name).parent.mkdir(parents=True, exist_ok=True)
            (output / "checkpoints" / name).write_text(text)
        before = tree(output)
        for epochs in (1, 2):
            code, escaped, _, stderr = _run_main(resume_argv(output, epochs))
            if escaped is not None or code != 0:
                what = f"{type(escaped).__name__}: {short(str(escaped), 200)}" if escaped else short(stderr[-300:])
                return Outcome("crash", f"the {epochs}-epoch run failed (exit {code}): {what}")
        gone, differ = lost(output, before), identical(output)
        if gone:
            doubt = (
                "; unsure: the name is a checkpoint_<n> one, which checkpoint.py's docstring does not list among "
                "the entries it leaves alone"
                if re.search(r"checkpoint_\d", gone[0])
                else ""
            )
            return Outcome("modified", f"the user's {gone} gone or changed{doubt}")
        if differ:
            return Outcome("silent", f"resumed, but differs from the uninterrupted run: {differ[:3]}")
        return Outcome(
            "documented",
            "extended 1 -> 2 epochs: bit-identical to the uninterrupted run, strays kept "
            "(checkpoint.py docstring: other entries of checkpoints/ are left alone)",
        )

    return run


def _subprocess(argv: list[str], work: Path, **kill: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]), **kill)
    return subprocess.run(
        [sys.executable, str(KILL_DRIVER), *argv], capture_output=True, text=True, timeout=400, env=env, cwd=work
    )


def _killed_then_resumed(kill: dict[str, str]) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        output = work / "run"
        output.mkdir()
        (output / "notes.txt").write_text("mine")
        killed = _subprocess(resume_argv(output, 2), work, **kill)
        if killed.returncode == 0:
            return Outcome("harness", f"the run was not killed ({kill})")
        code, escaped, _, stderr = _run_main(resume_argv(output, 2))
        if escaped is not None or code != 0:
            return Outcome(
                "crash", f"the resumed run failed (exit {code}): {short(str(escaped) if escaped else stderr[-300:])}"
            )
        if (output / "notes.txt").read_text() != "mine":
            return Outcome("modified", "the user's notes.txt changed")
        differ = identical(output)
        if differ:
            return Outcome("silent", f"resumed, but differs from the uninterrupted run: {differ[:3]}")
        return Outcome(
            "documented",
            f"killed (exit {killed.returncode}) then resumed: every tensor and the history "
            "bit-identical to the uninterrupted run (README: a resumed run is bit-identical)",
        )

    return run


def _finished_then(change: Callable[[Path], None], expect: str, *extra: str) -> Callable[[Path], Outcome]:
    """A finished 1-epoch run, `change`d, then rerun with 2 epochs (and `extra` options)."""

    def run(work: Path) -> Outcome:
        output = work / "run"
        if _run_main(resume_argv(output, 1))[0] != 0:
            return Outcome("harness", "the first run failed")
        change(output)
        before = tree(output)
        code, escaped, _, stderr = _run_main(resume_argv(output, 2, *extra))
        if escaped is not None or "Traceback (most recent" in stderr:
            what = f"{type(escaped).__name__}: {escaped}" if escaped else f"a traceback: {stderr[-300:]}"
            return Outcome("crash", short(what))
        if code == 2:
            changed = [n for n, d in before.items() if tree(output).get(n, b"\0") != d]
            if changed:
                return Outcome("modified", f"refused but changed {changed[:3]}")
            return Outcome("clear error", f"exit 2: {short(stderr.strip().splitlines()[-1], 250)}")
        if code != 0:
            return Outcome("crash", f"exit {code}: {short(stderr[-300:])}")
        if expect == "refuse":
            return Outcome("silent", "resumed without an error though the settings or checkpoint changed")
        differ = identical(output)
        if differ:
            return Outcome("silent", f"exit 0, but differs from the uninterrupted run: {differ[:3]}")
        return Outcome(
            "documented",
            "exit 0; bit-identical to the uninterrupted run (an incomplete checkpoint is never "
            "read: checkpoint.py docstring)",
        )

    return run


def _checkpoint_onto_full_tmpfs(work: Path) -> Outcome:
    """A run whose output directory is on a tmpfs that holds one checkpoint, not two: the second checkpoint fills
    it. Then the tmpfs grows (space freed) and the run is rerun."""
    checkpoint = next((FIX.root / "reference" / "run" / "checkpoints").iterdir())
    size = sum(path.stat().st_size for path in checkpoint.iterdir())
    output = work / "disk" / "run"
    try:
        with small_tmpfs(work / "disk", size * 3 // 2) as grow:
            code, escaped, _, stderr = _run_main(resume_argv(output, 2))
            lines = [line for line in stderr.splitlines() if "error:" in line]
            if escaped is not None or "Traceback (most recent" in stderr or code != 2 or not lines:
                what = f"{type(escaped).__name__}: {escaped}" if escaped else stderr[-300:]
                return Outcome("crash", f"exit {code}: {short(what)}")
            if "No space left on device" not in lines[-1] or str(output) not in lines[-1]:
                return Outcome(
                    "crash", f"exit 2, but the line does not say the disk is full where: {short(lines[-1])}"
                )
            grow(size * 10)
            code, escaped, _, stderr = _run_main(resume_argv(output, 2))
            if escaped is not None or code != 0:
                return Outcome("crash", f"the rerun after freeing space failed (exit {code}): {short(stderr[-300:])}")
            differ = identical(output)
    except NoTmpfs as error:
        return Outcome("harness", f"cannot mount a tmpfs: {error}")
    if differ:
        return Outcome("silent", f"the rerun after freeing space differs from the uninterrupted run: {differ[:3]}")
    return Outcome(
        "clear error",
        f"exit 2: {short(lines[-1], 250)}; after freeing space the rerun is bit-identical to the uninterrupted run",
    )


def _truncate_latest(output: Path) -> None:
    path = next((output / "checkpoints").glob("checkpoint_*/model.safetensors"))
    path.write_bytes(path.read_bytes()[:100])


def _drop_progress(output: Path) -> None:
    next((output / "checkpoints").glob("checkpoint_*/progress.json")).unlink()


def _corrupt_run_args(output: Path) -> None:
    (output / "run_args.json").write_text("{not json")


@dataclass
class Rerun:
    """A finished run (`first` options, `epochs[0]` epochs), `change`d, then rerun (`second` options, `epochs[1]`,
    `swap` replacing one of the first run's values, `env` in a fresh process): a rerun that must be refused in one
    line naming each of `names`, leaving the output directory as it was (issue 26, findings 1-5)."""

    names: tuple[str, ...]
    change: Callable[[Path], None] = lambda work: None
    first: tuple[str, ...] = ()
    second: tuple[str, ...] = ()
    epochs: tuple[int, int] = (1, 2)
    swap: tuple[str, str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    folder: bool = False  # train on an imagefolder (work/images) instead of the digits


def _rerun_refused(spec: Rerun) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        output = work / "run"
        data = ["--dataset", image_folder(work / "images", tuple("abcde"))] if spec.folder else []
        if _run_main(resume_argv(output, spec.epochs[0], *data, *spec.first))[0] != 0:
            return Outcome("harness", "the first run failed")
        spec.change(work)
        before = tree(output)
        argv = resume_argv(output, spec.epochs[1], *data, *spec.second)
        argv = [spec.swap[1] if spec.swap and arg == spec.swap[0] else arg for arg in argv]
        if spec.env:
            result = _subprocess(argv, work, **spec.env)
            code, escaped, stderr = result.returncode, None, result.stderr
        else:
            code, escaped, _, stderr = _run_main(argv)
        if escaped is not None or "Traceback (most recent" in stderr:
            return Outcome("crash", short(f"{type(escaped).__name__}: {escaped}" if escaped else stderr[-300:]))
        if code == 0:
            return Outcome("silent", "exit 0: it resumed (or kept) a run other than the one it was asked for")
        lines = [line for line in stderr.splitlines() if "error:" in line]
        if code != 2 or len(lines) != 1:
            return Outcome("crash", f"exit {code} without a one-line error: {short(stderr[-300:])}")
        changed = [name for name, data in before.items() if tree(output).get(name, b"\0") != data]
        if changed or set(tree(output)) != set(before):
            return Outcome("modified", f"refused but changed the output directory: {changed[:3]}")
        missing = [name for name in spec.names if name not in lines[0]]
        if missing:
            return Outcome("crash", f"exit 2, but the message does not name {missing}: {short(lines[0], 250)}")
        return Outcome("clear error", f"exit 2: {short(lines[0], 250)}")

    return run


def _add_images(work: Path) -> None:
    from PIL import Image

    for row in range(12, 15):
        Image.new("RGB", (16, 16), (0, 0, row)).save(work / "images" / "a" / f"{row}.png")


def _two_runs_at_once(work: Path) -> Outcome:
    """Issue 26, finding 6: a second train on one --output-dir while the first runs (stopped mid-epoch)."""
    output = work / "run"
    env = {key: value for key, value in os.environ.items() if not key.startswith("ACCELERATE_")}
    env.update(OMP_NUM_THREADS="1", KILL_AFTER_STEPS="1", KILL_SIGNAL="STOP")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    first = subprocess.Popen(
        [sys.executable, str(KILL_DRIVER), *resume_argv(output, 1)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=work,
    )  # fmt: skip
    try:
        _, status = os.waitpid(first.pid, os.WUNTRACED)
        if not os.WIFSTOPPED(status):
            return Outcome("harness", f"the first run did not stop mid-epoch (wait status {status})")
        code, escaped, _, stderr = _run_main(resume_argv(output, 1, "--lr", "0.02"))
    finally:
        os.kill(first.pid, signal.SIGCONT)
    finished = first.wait(timeout=400)
    if finished != 0:
        return Outcome("harness", f"the first run failed after the second: exit {finished}")
    summary = json.loads((output / "metrics.json").read_text())
    saved = load_file(output / "adapter" / WEIGHTS)
    digest = hashlib.sha256(safetensors_save(dict(sorted(saved.items())))).hexdigest()
    if code == 0 or summary["lr"] != 0.01 or summary["adapter_sha256"] != digest:
        return Outcome(
            "silent",
            f"second run exit {code}; metrics.json lr {summary['lr']}; its adapter_sha256 the adapter's: "
            f"{summary['adapter_sha256'] == digest}",
        )
    if escaped is not None or code != 2 or f"(id {first.pid})" not in stderr:
        return Outcome("crash", f"second run exit {code}, not naming the first's process id: {short(stderr[-300:])}")
    return Outcome(
        "clear error", f"exit 2: {short(stderr.strip().splitlines()[-1], 250)}; the first run finished whole"
    )


def _non_finite(extra: list[str], what: str) -> tuple[str, Cli]:
    return f"non-finite training: {what}", Cli([*TRAIN, *extra], "stop")


def area_d() -> list[Attempt]:
    attempts = [
        Attempt("D", name, cli_attempt(spec), timeout=120)
        for name, spec in [
            _non_finite(["--lr", "1e30"], "--lr 1e30"),
            _non_finite(["--lr", "1e30", "--cache-features"], "--lr 1e30 --cache-features"),
            _non_finite(["--lr", "1e30", "--strategy", "lp-ft"], "--lr 1e30 --strategy lp-ft"),
            (
                "non-finite training: --lr 1e30 --block all",
                Cli([*TRAIN[:3], *TRAIN[5:], "--block", "all", "--lr", "1e30"], "stop"),
            ),
            _non_finite(["--weight-decay", "1e30"], "--weight-decay 1e30"),
            _non_finite(["--lr", "1e30", "--delta-dtype", "float16"], "--lr 1e30 --delta-dtype float16"),
        ]
    ]
    strays = [
        {".DS_Store": "finder"},
        {"checkpoint_backup/notes.txt": "mine"},
        {"README.txt": "mine"},
        {"checkpoint_7/notes.txt": "a user's folder named like an incomplete checkpoint"},
    ]
    for stray in strays:
        attempts.append(
            Attempt("D", f"resume with a stray {next(iter(stray))} in checkpoints/", _resume_with_stray(stray), 400)
        )
    attempts += [
        Attempt(
            "D",
            "resume: the latest checkpoint's model.safetensors truncated",
            _finished_then(_truncate_latest, "either"),
            400,
        ),
        Attempt(
            "D", "resume: the latest checkpoint's progress.json deleted", _finished_then(_drop_progress, "either"), 400
        ),
        Attempt("D", "resume with a changed --lr", _finished_then(lambda o: None, "refuse", "--lr", "0.02"), 400),
        Attempt(
            "D",
            "resume with a changed --batch-size",
            _finished_then(lambda o: None, "refuse", "--batch-size", "15"),
            400,
        ),
        Attempt("D", "resume: run_args.json corrupted", _finished_then(_corrupt_run_args, "either"), 400),
        Attempt("D", "SIGKILL mid-epoch, then resume", _killed_then_resumed({"KILL_AFTER_STEPS": "5"}), 500),
        Attempt(
            "D",
            "SIGINT mid-epoch, then resume",
            _killed_then_resumed({"KILL_AFTER_STEPS": "5", "KILL_SIGNAL": "INT"}),
            500,
        ),
        Attempt(
            "D",
            "SIGKILL while writing the 2nd checkpoint, then resume",
            _killed_then_resumed({"KILL_AT": "accelerate.checkpointing:save", "KILL_AT_CALL": "4"}),
            500,
        ),
        Attempt(
            "D", "SIGKILL while saving the final adapter, then rerun", _killed_then_resumed({KILL_HOOK: "staged"}), 500
        ),
        Attempt(
            "D", "disk full while writing the 2nd checkpoint (tmpfs), then rerun", _checkpoint_onto_full_tmpfs, 400
        ),
        Attempt("D", "two train runs at once on one --output-dir", _two_runs_at_once, 500),
    ]
    delete_run_args = lambda work: (work / "run" / "run_args.json").unlink()  # noqa: E731
    reruns = {
        "run_args.json deleted, then --lr 0.003": Rerun(
            ("--lr 0.01 there, 0.003 now",), delete_run_args, second=("--lr", "0.003")
        ),
        "run_args.json deleted, then --block stage1": Rerun(
            ("--block stage2 there, stage1 now",), delete_run_args, swap=("stage2", "stage1")
        ),
        "a finished 2-epoch run rerun with --epochs 1": Rerun(
            ("2 epoch(s) of fine-tune trained, 1 asked for", "--epochs"), epochs=(2, 1)
        ),
        "--lp-epochs raised once the linear-probe phase is over": Rerun(
            ("linear-probe is over after 1 epoch(s)",),
            first=("--strategy", "lp-ft", "--lp-epochs", "1"),
            second=("--strategy", "lp-ft", "--lp-epochs", "2"),
        ),
        "resume with ACCELERATE_MIXED_PRECISION=bf16 in the environment": Rerun(
            ("mixed_precision no there, bf16 now", "ACCELERATE_MIXED_PRECISION=bf16 in the environment"),
            env={"ACCELERATE_MIXED_PRECISION": "bf16"},
        ),
        "resume with ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2 in the environment": Rerun(
            ("gradient_accumulation_steps 1 there, 2 now", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS=2"),
            env={"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2"},
        ),
        "resume after 3 images were added to the imagefolder": Rerun(
            ("3 images added to", "/images/a (12.png, 13.png, 14.png)"), _add_images, folder=True
        ),
        "resume after an image of the imagefolder was deleted": Rerun(
            ("1 image removed from", "/images/b (0.png)"),
            lambda work: (work / "images" / "b" / "0.png").unlink(),
            folder=True,
        ),
    }
    attempts += [Attempt("D", f"resume: {name}", _rerun_refused(spec), 400) for name, spec in reruns.items()]
    return attempts


# ------------------------------------------------------------------------------------------------------- the report
def table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| area | attempts | " + " | ".join(CATEGORIES.values()) + " |",
        "|---" + "|---:" * (len(CATEGORIES) + 1) + "|",
    ]
    for area in [*AREAS, "total"]:
        chosen = [r for r in results if area in ("total", r["area"])]
        if not chosen:
            continue
        counts = Counter(r["category"] for r in chosen)
        label = "**total**" if area == "total" else f"{area}: {AREAS[area]}"
        rows.append(f"| {label} | {len(chosen)} | " + " | ".join(str(counts[c]) for c in CATEGORIES) + " |")
    harness = sum(r["category"] == "harness" for r in results)
    return "\n".join(rows) + (
        f"\n\n{harness} attempt(s) failed in the battery itself (category `harness`)." if harness else ""
    )


def write_report(results: list[dict[str, Any]], seconds: float) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "attacks.json").write_text(json.dumps({"seconds": round(seconds, 1), "attempts": results}, indent=1))
    lines = [
        "# Attack battery (issue 12)",
        "",
        f"`python benchmarks/attacks.py`: {len(results)} attempts in "
        f"{seconds / 60:.1f} min (torch {torch.__version__}, {os.cpu_count()} CPU cores). How each attempt is "
        "classified: the module docstring of `benchmarks/attacks.py`.",
        "",
        table(results),
        "",
    ]
    unnamed = [r for r in results if r["category"] == "clear error" and NOT_NAMED in r["note"]]
    lines += [f"Of the clear errors, {len(unnamed)} are the library's `InputError` with a message that names the "
              "field or tensor but not the file (the README's 'Safety' promises both); they are listed after the "
              "findings.", ""]  # fmt: skip
    findings = [r for r in results if r["category"] in ("crash", "silent", "modified", "harness")]
    lines += ["## Findings (unhelpful crashes, silent wrong results, data loss / modified models)", ""]
    lines += [f"- **{r['category']}**, {r['area']}: {r['name']}: {r['note']}" for r in findings] or ["None."]
    lines += ["", "## Clear errors that do not name the file", ""]
    lines += [f"- {r['area']}: {r['name']}: {r['note']}" for r in unnamed] or ["None."]
    for area in AREAS:
        chosen = [r for r in results if r["area"] == area]
        if chosen:
            lines += ["", f"## {area}: {AREAS[area]}", "", "| attempt | outcome | note |", "|---|---|---|"]
            lines += [
                f"| {r['name'].replace('|', '/')} | {r['category']} | {r['note'].replace('|', '/')} |" for r in chosen
            ]
    (RESULTS / "attacks.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--area", action="append", choices=sorted(AREAS), help="run only this area (repeatable)")
    parser.add_argument(
        "--match", action="append", help="run only the attempts whose name contains this (repeatable: any of them)"
    )
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--verbose", action="store_true", help="print every attempt's outcome as it comes")
    args = parser.parse_args(argv)
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="surgical-attacks-"))
    root.chmod(0o755)  # the read-only attempts run as an unprivileged user
    try:
        prepare(root)
        areas = {"A": area_a, "B": area_b, "C": area_c, "D": area_d}
        attempts = [a for key in (args.area or AREAS) for a in areas[key]()]
        attempts = [a for a in attempts if args.match is None or any(text in a.name for text in args.match)]
        if any(a.area == "D" for a in attempts):
            (root / "reference").mkdir()
            print(execute(Attempt("D", "reference", _reference, 400), root / "reference").note)
        results = []
        for index, attempt in enumerate(tqdm(attempts, desc="attacks", unit="attempt")):
            work = root / f"attempt-{index}"
            work.mkdir()
            begun = time.monotonic()
            outcome = execute(attempt, work)
            outcome.note = outcome.note.replace(str(root), "<tmp>")
            seconds = round(time.monotonic() - begun, 1)
            results.append(
                {
                    "area": attempt.area,
                    "name": attempt.name,
                    "category": outcome.category,
                    "note": outcome.note,
                    "seconds": seconds,
                }
            )
            unmount_under(work)
            shutil.rmtree(work, ignore_errors=True)
            if args.verbose:
                tqdm.write(f"[{outcome.category}] ({seconds} s) {attempt.name}: {outcome.note}", file=sys.stdout)
                sys.stdout.flush()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - started
    print(table(results))
    print(f"{len(results)} attempts in {seconds / 60:.1f} min")
    if not args.no_write:
        write_report(results, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
