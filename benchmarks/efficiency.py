"""Efficiency of surgical fine-tuning against full fine-tuning, hand-written freezing and LoRA.

For a ResNet-50-shaped model (`ResNetConfig()`) and a ViT-B/16-shaped one (`ViTConfig()`), randomly initialised,
batch 16 at 224x224, AdamW, for full fine-tuning, single blocks, hand-written `requires_grad` freezing of some of the
same blocks and LoRA (r=8 on every Conv2d and Linear), this measures:

- memory and sizes, each configuration in a fresh process: the peak memory of training (peak RSS on CPU, peak
  allocated memory on CUDA) above what the process held once the model and the data were built, so the PEFT
  wrapper's own costs (the tuner's CPU snapshot of the tuned block) count; trainable parameters; optimizer state
  bytes; the bytes of what one saves: the adapter file written by `save_pretrained` (surgical: also with
  `delta_dtype="bfloat16"`), or the full checkpoint; the FLOPs of one training step, and of one step served by the
  feature cache (`torch.utils.flop_counter`), the speed-ups that arithmetic alone would give;
- times, all configurations of an architecture in one process, one step of each in turn (the order rotating every
  round), so that other load on the machine slows them alike, with freed memory kept for reuse (`keep_freed_memory`):
  the median step, the epoch (a fixed number of
  distinct batches), and with `surgical_peft.features.FeatureCache` the epoch that fills the cache and the next one,
  which uses it. A variant of some surgical configurations runs the frozen prefix under `torch.no_grad()`, to show
  whether that would buy anything over plain autograd;
- on CPU, for ResNet-50, each configuration's step time alone in a fresh process with the default allocator;
- with `--checkpointing` (only these rows, spliced into the report): gradient checkpointing enabled before
  `get_peft_model`, as PEFT's guides do, against the same configurations without it, for ViT-B/16 (transformers'
  ResNet does not support checkpointing) at batch 8: the peak memory, then the step time, in a fresh process per
  run, every configuration run `--repeats` times in turn (medians reported, the report rewritten after each round).

Every figure is also given as a ratio to full fine-tuning measured in the same run. Frozen BatchNorm layers run in
eval mode in every configuration (the surgical tuner does it; hand-written freezing and LoRA are set up the same way);
full fine-tuning trains every BatchNorm.

Usage:
    python benchmarks/efficiency.py                  # the full run (about 30 minutes on 2 otherwise idle cores)
    python benchmarks/efficiency.py --quick          # tiny models, a few steps: a smoke test
    python benchmarks/efficiency.py --device cuda    # on a GPU (timings synchronised, peak allocated memory)
    python benchmarks/efficiency.py --checkpointing  # only the gradient checkpointing rows (about 20 minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm.auto import tqdm
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

import surgical_peft
from surgical_peft.blocks import is_under
from surgical_peft.features import FeatureCache

Item = TypeVar("Item")
RESULTS = Path(__file__).resolve().parent / "results"
BATCH_SIZE = 16
CACHE_BYTES = 32 * 2**30
MEMORY_STEPS = 2  # the second step is the first with optimizer state, activations and gradients all alive
ARCHS = {"resnet50": "ResNet-50 (ResNetConfig())", "vit_b16": "ViT-B/16 (ViTConfig())"}
BLOCKS = {
    "resnet50": ["embedder", "stage1", "stage2", "stage3", "stage4", "head"],
    # A representative subset, to keep the run short: the ViT layers differ only in depth.
    "vit_b16": ["layer1", "layer6", "layer12", "norm", "head"],
}
QUICK_BLOCKS = {"resnet50": ["stage1", "stage4", "head"], "vit_b16": ["layer1", "layer4", "norm", "head"]}
FIRST_BLOCK = {"resnet50": "embedder", "vit_b16": "embeddings"}  # no frozen prefix: nothing to cache
# Outside --quick: blocks also trained with hand-written freezing, also timed with a no_grad prefix, also cached.
HAND = {"resnet50": {"stage1", "stage4", "head"}, "vit_b16": {"layer12", "head"}}
NO_GRAD = {"resnet50": {"stage4", "head"}, "vit_b16": {"layer12", "head"}}
CACHED = {"resnet50": {"stage1", "stage2", "stage3", "stage4", "head"}, "vit_b16": {"layer12", "norm", "head"}}
# On CPU, also timed alone in a fresh process each, with glibc's default allocator (as a user runs them).
ALONE = {"resnet50"}
# Gradient checkpointing (--checkpointing): the blocks (None: full fine-tuning), at issue 11's batch size.
CHECKPOINTING_BLOCKS = {"vit_b16": [None, "layer1", "head"]}
CHECKPOINTING_BATCH_SIZE = 8
CHECKPOINTING_SECTION = "## Gradient checkpointing"


@dataclass(frozen=True)
class Schedule:
    """How many rounds of steps the timing takes."""

    warmup: int  # untimed rounds first
    epoch: int  # timed rounds: steps (distinct batches) per epoch


SCHEDULES = {
    "resnet50": Schedule(warmup=2, epoch=8),
    "vit_b16": Schedule(warmup=1, epoch=6),
    "quick": Schedule(warmup=1, epoch=3),
    "checkpointing": Schedule(warmup=1, epoch=3),
}


@dataclass(frozen=True)
class Config:
    """One training configuration."""

    arch: str
    method: str  # "full", "surgical", "hand" (hand-written requires_grad freezing) or "lora"
    block: str | None = None
    checkpointing: bool = False  # `gradient_checkpointing_enable()` on the model first, as PEFT's guides do

    @property
    def name(self) -> str:
        names = {"full": "full fine-tuning", "surgical": "surgical", "hand": "hand-written", "lora": "LoRA r=8"}
        checkpointing = " + checkpointing" if self.checkpointing else ""
        return names[self.method] + (f" `{self.block}`" if self.block else "") + checkpointing


@dataclass
class Footprint:
    """Sizes measured in a fresh process (bytes)."""

    trainable_params: int
    peak_memory: int
    optimizer_bytes: int
    saved_bytes: int | None = None  # adapter file (surgical, LoRA) or full checkpoint (full)
    saved_bf16_bytes: int | None = None  # surgical adapter with delta_dtype="bfloat16"
    step_flops: int = 0  # of one training step, as torch.utils.flop_counter counts them (matrix products)
    cached_step_flops: int | None = None  # of a step whose batch is all in the feature cache


@dataclass
class Timing:
    """Step times from the interleaved rounds (seconds); the epoch is the sum of one pass over the batches."""

    steps: list[float]
    cpu: list[float]  # process CPU time of each step
    fill_epoch: float | None = None  # first epoch with the feature cache
    cached_epoch: float | None = None  # second epoch with it (full fine-tuning: its epoch in the same rounds)
    cache_bytes: int | None = None

    @property
    def step(self) -> float:
        return statistics.median(self.steps)

    @property
    def step_cpu(self) -> float:
        return statistics.median(self.cpu)

    @property
    def epoch(self) -> float:
        return sum(self.steps)


class Batch(NamedTuple):
    pixel_values: torch.Tensor
    labels: torch.Tensor
    indices: list[int]


# --------------------------------------------------------------------------------------------------- training
def build_model(arch: str, quick: bool, device: torch.device) -> nn.Module:
    """A ResNet-50 or ViT-B/16 with random weights drawn from seed 0 (tiny versions with `quick`)."""
    torch.manual_seed(0)
    if arch == "resnet50":
        tiny = {"embedding_size": 16, "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1]}
        model = ResNetForImageClassification(ResNetConfig(**(tiny if quick else {})))
    else:
        tiny = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 4}
        tiny |= {"num_attention_heads": 2, "intermediate_size": 64}
        model = ViTForImageClassification(ViTConfig(**(tiny if quick else {})))
    return model.to(device)


def make_batches(count: int, quick: bool, device: torch.device, batch_size: int = BATCH_SIZE) -> list[Batch]:
    """`count` distinct batches of random images and labels (2 classes, as `ResNetConfig()` and `ViTConfig()`)."""
    size = 32 if quick else 224
    generator = torch.Generator().manual_seed(1)
    return [
        Batch(
            torch.randn(batch_size, 3, size, size, generator=generator).to(device),
            torch.randint(0, 2, (batch_size,), generator=generator).to(device),
            list(range(index * batch_size, (index + 1) * batch_size)),
        )
        for index in range(count)
    ]


def _freeze_norms(model: nn.Module, except_under: tuple[str, ...] = ()) -> None:
    """Put BatchNorm layers outside `except_under` in eval mode, as the surgical tuner does for frozen ones."""
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not is_under(path, except_under):
            module.eval()


class Trainee:
    """A model set up for a configuration, with its AdamW optimizer."""

    def __init__(self, config: Config, model: nn.Module) -> None:
        self.config = config
        self.model = model
        self.trainer = self._prepare(config, model)  # what a training step calls
        self.parameters = [p for p in self.trainer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=1e-4)

    @staticmethod
    def _prepare(config: Config, model: nn.Module) -> nn.Module:
        model.train()
        if config.checkpointing:
            model.gradient_checkpointing_enable()
        if config.method == "full":
            return model
        if config.method == "surgical":
            return get_peft_model(model, surgical_peft.SurgicalConfig(block=config.block)).train()
        if config.method == "hand":
            tuned = tuple(surgical_peft.list_blocks(model)[config.block])
            for path, parameter in model.named_parameters():
                parameter.requires_grad_(is_under(path, tuned))
            _freeze_norms(model, tuned)
            return model
        targets = [path for path, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
        lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets)).train()
        _freeze_norms(lora)
        return lora

    def step(self, batch: Batch, around_forward: AbstractContextManager | None = None) -> None:
        with around_forward or contextlib.nullcontext():
            loss = self.trainer(pixel_values=batch.pixel_values, labels=batch.labels).loss
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def prefix_without_grad(self) -> AbstractContextManager:
        """Grad mode off from the first block up to this configuration's block, via two forward pre-hooks."""
        blocks = surgical_peft.list_blocks(self.model)
        return _grad_mode_between(self.model, blocks[next(iter(blocks))][0], blocks[self.config.block][0])


@contextlib.contextmanager
def _grad_mode_between(model: nn.Module, first: str, entry: str) -> Iterator[None]:
    def grad_mode(enabled: bool) -> Callable[..., None]:
        def hook(*_: Any) -> None:
            torch.set_grad_enabled(enabled)

        return hook

    hooks = [
        model.get_submodule(first).register_forward_pre_hook(grad_mode(False)),
        model.get_submodule(entry).register_forward_pre_hook(grad_mode(True)),
    ]
    try:
        with torch.enable_grad():
            yield
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------------ measurement
def _glibc(device: torch.device) -> ctypes.CDLL | None:
    """glibc, whose allocator serves CPU tensors; `None` for other devices or without glibc."""
    if device.type != "cpu":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(device: torch.device) -> None:
    """On CPU with glibc, keep freed memory in the process for reuse, as PyTorch's CUDA caching allocator does.

    With glibc's defaults, activation buffers above its adaptive mmap threshold are returned to the system when freed
    and page-faulted in again by the next step: full fine-tuning's ResNet-50 step measured 4.3-5.1 s in a fresh
    process against 2.9-3.5 s with this setting, and by how much depended on the history of the process. A fixed,
    maximal threshold (32 MiB) and no trimming make every configuration run under the same steady conditions.
    """
    libc = _glibc(device)
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)


class Memory:
    """Peak memory since `reset()`, above what was in use at the reset.

    On CPU with glibc, large allocations are served by mmap at a fixed threshold from construction on, and the heap
    is trimmed at `reset()`: freed tensors then leave the RSS at once and none is counted in the baseline, so that the
    peak RSS is the memory training holds, not what glibc's adaptive thresholds happen to keep (which varied by about
    90 MB between processes running the same configuration).
    """

    _MMAP_THRESHOLD_BYTES = 64 * 2**10

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0
        self.libc = _glibc(device)
        if self.libc is not None:
            self.libc.mallopt(_M_MMAP_THRESHOLD, self._MMAP_THRESHOLD_BYTES)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/status") as status:
            return int(re.search(r"^VmRSS:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)) * 1024

    @staticmethod
    def _maxrss() -> int:
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM, and getrusage's maxrss)
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")
            self.baseline = self._rss()
        except OSError:  # elsewhere the peak is the process's: the baseline is its peak so far
            self.baseline = self._maxrss()

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return self._maxrss() - self.baseline


@contextlib.contextmanager
def timed(device: torch.device, wall: list[float], cpu: list[float]) -> Iterator[None]:
    """Append the wall-clock and process CPU time of the block (synchronised on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)


def _file_bytes(directory: str, name: str) -> int:
    return (Path(directory) / name).stat().st_size


def count_flops(trainee: Trainee, batch: Batch, around_forward: AbstractContextManager | None = None) -> int:
    """FLOPs of one training step (forward and backward), as `torch.utils.flop_counter.FlopCounterMode` counts them."""
    with FlopCounterMode(display=False) as counter:
        trainee.step(batch, around_forward)
    return counter.get_total_flops()


def measure_peak(
    config: Config, quick: bool, device: torch.device, batch_size: int = BATCH_SIZE
) -> tuple[Trainee, list[Batch], int]:
    """The trainee, its batches and the peak memory of its first `MEMORY_STEPS` training steps (call in a fresh
    process)."""
    memory = Memory(device)
    batches = make_batches(MEMORY_STEPS, quick, device, batch_size)
    model = build_model(config.arch, quick, device)
    memory.reset()
    trainee = Trainee(config, model)
    for batch in batches:
        trainee.step(batch)
    return trainee, batches, memory.peak()


def measure_footprint(config: Config, cached: bool, quick: bool, device: torch.device) -> Footprint:
    """Peak memory of `MEMORY_STEPS` training steps, sizes and FLOPs per step, also for a step from the feature cache
    if `cached` (call in a fresh process)."""
    trainee, batches, peak = measure_peak(config, quick, device)
    model = trainee.model
    footprint = Footprint(
        trainable_params=sum(p.numel() for p in trainee.parameters),
        peak_memory=peak,
        optimizer_bytes=sum(
            t.numel() * t.element_size()
            for state in trainee.optimizer.state.values()
            for t in state.values()
            if isinstance(t, torch.Tensor)
        ),
        step_flops=count_flops(trainee, batches[0]),
    )
    if cached:
        cache = FeatureCache(trainee.trainer, deterministic=True, max_bytes=CACHE_BYTES)
        trainee.step(batches[0], cache.batch(batches[0].indices))  # fills the cache
        footprint.cached_step_flops = count_flops(trainee, batches[0], cache.batch(batches[0].indices))
    with tempfile.TemporaryDirectory() as directory:
        if config.method == "full":
            model.save_pretrained(directory)
            footprint.saved_bytes = _file_bytes(directory, "model.safetensors")
        elif config.method in ("surgical", "lora"):
            trainee.trainer.save_pretrained(directory)
            footprint.saved_bytes = _file_bytes(directory, "adapter_model.safetensors")
        if config.method == "surgical":
            trainee.trainer.peft_config["default"].delta_dtype = "bfloat16"
            trainee.trainer.save_pretrained(directory)
            footprint.saved_bf16_bytes = _file_bytes(directory, "adapter_model.safetensors")
    return footprint


def _rotations(items: list[Item], rounds: int) -> Iterator[list[Item]]:
    """`items` in a different order each round, so that none always runs first or after another."""
    for round_ in range(rounds):
        start = round_ % len(items)
        yield items[start:] + items[:start]


def _ratios(steps: list[float], others: list[float]) -> list[float]:
    """Per round, the ratio of two steps timed next to each other, so that changes in load cancel."""
    return [step / other for step, other in zip(steps, others, strict=True)]


def _paired(steps: list[float], others: list[float]) -> float:
    """Median over rounds of the ratio of two steps timed next to each other."""
    return statistics.median(_ratios(steps, others))


def _paired_spread(steps: list[float], others: list[float]) -> str:
    """The paired median with the quartiles of the per-round ratios, e.g. `0.985 (0.962-1.004)`."""
    ratios = _ratios(steps, others)
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} ({low:.3f}-{high:.3f})"


def measure_times(
    configs: list[Config], no_grad: set[str], cached: set[str], schedule: Schedule, quick: bool, device: torch.device
) -> dict[str, Timing]:
    """Interleaved step times of `configs` (one architecture), keyed by configuration name; surgical blocks in
    `no_grad` are also timed with the prefix under no_grad (key: name + " no_grad prefix"), those in `cached` also
    with the feature cache. Call in a fresh process: it sets the allocator (`keep_freed_memory`)."""
    keep_freed_memory(device)
    batches = make_batches(schedule.epoch, quick, device)
    trainees = {
        config.name: Trainee(config, build_model(config.arch, quick, device))
        for config in tqdm(configs, desc="  building", leave=False)
    }
    steps: dict[str, Callable[[Batch], None]] = {}
    # The variants of one block (surgical, its no_grad prefix, hand-written) run next to each other, in an order
    # reversed every round, for paired comparisons.
    groups: dict[str, list[str]] = {}
    for name, trainee in trainees.items():
        steps[name] = trainee.step
        group = groups.setdefault(trainee.config.block if trainee.config.method in ("surgical", "hand") else name, [])
        group.append(name)
        if trainee.config.method == "surgical" and trainee.config.block in no_grad:
            steps[f"{name} no_grad prefix"] = lambda batch, t=trainee: t.step(batch, t.prefix_without_grad())
            group.append(f"{name} no_grad prefix")
    wall: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}
    rounds = schedule.warmup + schedule.epoch
    orders = tqdm(_rotations(list(groups.values()), rounds), total=rounds, desc="  rounds", leave=False)
    for round_, order in enumerate(orders):
        batch = batches[(round_ - schedule.warmup) % len(batches)]
        for name in (name for group in order for name in (group if round_ % 2 else group[::-1])):
            if round_ < schedule.warmup:
                steps[name](batch)
                continue
            with timed(device, wall[name], cpu[name]):
                steps[name](batch)
    timings = {name: Timing(wall[name], cpu[name]) for name in steps}

    caches = {
        name: FeatureCache(trainee.trainer, deterministic=True, max_bytes=CACHE_BYTES)
        for name, trainee in trainees.items()
        if _is_cached(trainee.config, cached)
    }
    # Full fine-tuning runs in the rounds of the cached epoch too, as the reference under the same load.
    full = next(name for name, trainee in trainees.items() if trainee.config.method == "full")
    for field, names in (("fill_epoch", list(caches)), ("cached_epoch", [*caches, full])):
        epoch_wall: dict[str, list[float]] = {name: [] for name in names}
        rotations = _rotations(names, len(batches))
        for batch, order in zip(tqdm(batches, desc=f"  {field}", leave=False), rotations, strict=True):
            for name in order:
                with timed(device, epoch_wall[name], []):
                    trainees[name].step(batch, caches[name].batch(batch.indices) if name in caches else None)
        for name, values in epoch_wall.items():
            setattr(timings[name], field, sum(values))
    for name, cache in caches.items():
        timings[name].cache_bytes = cache.nbytes
    return timings


def measure_fresh_steps(config: Config, schedule: Schedule, quick: bool, device: torch.device) -> Timing:
    """Step times of one configuration alone in a fresh process, with the allocator as a user's process has it
    (glibc's defaults on CPU): what a user who trains only this configuration sees, load and all."""
    batches = make_batches(schedule.epoch, quick, device)
    trainee = Trainee(config, build_model(config.arch, quick, device))
    for _ in range(schedule.warmup):
        trainee.step(batches[0])
    wall: list[float] = []
    cpu: list[float] = []
    for batch in batches:
        with timed(device, wall, cpu):
            trainee.step(batch)
    return Timing(wall, cpu)


def _call_and_send(connection: Connection, threads: int, function: Callable[..., Any], *args: Any) -> None:
    torch.set_num_threads(threads)
    connection.send(function(*args))


def _is_cached(config: Config, cached: set[str]) -> bool:
    return config.method == "surgical" and config.block in cached


def in_fresh_process(threads: int, device: torch.device, function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` in a new process (forked on CPU, so the libraries are not imported again)."""
    fork = device.type == "cpu" and "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_call_and_send, args=(sender, threads, function, *args))
    process.start()
    sender.close()
    try:
        result = receiver.recv()
    except EOFError:
        result = None
    process.join()
    if result is None or process.exitcode != 0:
        raise RuntimeError(f"{function.__name__}{args} failed (exit {process.exitcode}); its error is above.")
    return result


# ---------------------------------------------------------------------------------------- gradient checkpointing
@dataclass
class CheckpointingRow:
    """One configuration's measurements, one per run, each in a fresh process."""

    config: Config
    peaks: list[int]  # peak memory of each run (bytes)
    steps: list[float]  # median step of each run (seconds)

    @property
    def peak(self) -> float:
        return statistics.median(self.peaks)

    @property
    def step(self) -> float:
        return statistics.median(self.steps)


def measure_peak_and_steps(config: Config, schedule: Schedule, quick: bool, device: torch.device) -> tuple[int, float]:
    """The peak memory of the first `MEMORY_STEPS` steps, then, with freed memory kept for reuse, the median of
    `schedule.epoch` steps after `schedule.warmup` more (call in a fresh process)."""
    trainee, batches, peak = measure_peak(config, quick, device, CHECKPOINTING_BATCH_SIZE)
    keep_freed_memory(device)
    for _ in range(schedule.warmup):
        trainee.step(batches[0])
    wall: list[float] = []
    for index in range(schedule.epoch):
        with timed(device, wall, []):
            trainee.step(batches[index % len(batches)])
    return peak, statistics.median(wall)


def measure_checkpointing(
    arch: str, args: argparse.Namespace, device: torch.device, report: Callable[[list[CheckpointingRow]], None]
) -> list[CheckpointingRow]:
    """`CHECKPOINTING_BLOCKS[arch]` with and without gradient checkpointing, all in turn, `args.repeats` times, each
    run in a fresh process; `report` is called with the rows after every round."""
    rows = [
        CheckpointingRow(Config(arch, "full" if block is None else "surgical", block, checkpointing), [], [])
        for block in CHECKPOINTING_BLOCKS[arch]
        for checkpointing in (False, True)
    ]
    schedule = SCHEDULES["quick" if args.quick else "checkpointing"]
    for _ in tqdm(range(args.repeats), desc=f"{arch}: checkpointing runs"):
        for row in rows:
            peak, step = in_fresh_process(
                args.threads, device, measure_peak_and_steps, row.config, schedule, args.quick, device
            )
            row.peaks.append(peak)
            row.steps.append(step)
        report(rows)
    return rows


def _spread(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """The median with the range over runs, e.g. `0.985 (0.962-1.004)`."""
    median, low, high = (value / scale for value in (statistics.median(values), min(values), max(values)))
    return f"{median:,.{digits}f} ({low:,.{digits}f}-{high:,.{digits}f})"


def checkpointing_section(rows: list[CheckpointingRow], args: argparse.Namespace, loads: list[float]) -> list[str]:
    """The report's gradient checkpointing section: the rows, and issue 11's targets against them."""
    by_key = {(row.config.block, row.config.checkpointing): row for row in rows}
    full = by_key[None, False]
    schedule = SCHEDULES["quick" if args.quick else "checkpointing"]
    lines = [
        CHECKPOINTING_SECTION,
        "",
        f"`python benchmarks/efficiency.py {' '.join(sys.argv[1:])}`: {ARCHS[full.config.arch]}, batch "
        f"{CHECKPOINTING_BATCH_SIZE}, AdamW, {args.threads} threads; checkpointing is enabled as PEFT's guides do, "
        "`model.gradient_checkpointing_enable()` (transformers' default: non-reentrant) before `get_peft_model`. "
        f"Each figure is the median of {len(full.steps)} runs (their range in brackets), every run of every "
        "configuration in a fresh process, the configurations in turn: the peak memory of its first "
        f"{MEMORY_STEPS} steps, measured as above, then the median of {schedule.epoch} steps after {schedule.warmup} "
        "more, with freed memory kept for reuse (as in the interleaved timing). Load average (1 min) while it ran: "
        f"{min(loads):.1f} to {max(loads):.1f} on this machine.",
        "",
        "| configuration | step s | step: with / without checkpointing | peak memory MB | peak memory: with / "
        "without | peak memory % of full fine-tuning |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        own = by_key[row.config.block, False]
        cells = [
            row.config.name,
            _spread(row.steps),
            f"{row.step / own.step:.2f}x",
            _spread(row.peaks, 2**20, 1),
            f"{100 * row.peak / own.peak:.0f}%",
            f"{100 * row.peak / full.peak:.0f}%",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    head, head_ckpt = by_key.get(("head", False)), by_key.get(("head", True))
    early, early_ckpt = by_key.get(("layer1", False)), by_key.get(("layer1", True))
    checks = []
    if head and head_ckpt:
        checks += [
            ("`head` with checkpointing: step <= 1.1x without", head_ckpt.step / head.step, 1.1, "x"),
            ("`head` with checkpointing: peak memory <= 105% of without", 100 * head_ckpt.peak / head.peak, 105, "%"),
        ]
    if early and early_ckpt:
        checks += [
            (
                "`layer1` with checkpointing: peak memory <= 35% of full fine-tuning's",
                100 * early_ckpt.peak / full.peak,
                35,
                "%",
            ),
            ("`layer1` with checkpointing: step <= 1.4x without", early_ckpt.step / early.step, 1.4, "x"),
        ]
    lines += ["", "Targets (issue 11):", ""]
    lines += [
        f"- {text}: {value:.2f}{unit} -> {'holds' if value <= limit else 'MISSED'}"
        for text, value, limit, unit in checks
    ]
    return lines


def _checkpointing_section_of(path: Path) -> str:
    """The gradient checkpointing section of the report at `path` ("" if none): a full run keeps it."""
    text = path.read_text() if path.exists() else ""
    start = text.find(CHECKPOINTING_SECTION)
    return "" if start < 0 else "\n" + text[start:]


def write_checkpointing_report(rows: list[CheckpointingRow], args: argparse.Namespace, loads: list[float]) -> str:
    """Put the gradient checkpointing section into the report (replacing an older one; the rest is kept), and the
    measurements of every run into their own CSV."""
    stem = RESULTS / f"efficiency_{args.device}{'_quick' if args.quick else ''}"
    path = stem.with_suffix(".md")
    text = path.read_text() if path.exists() else f"# Efficiency benchmark ({args.device})\n"
    start = text.find(CHECKPOINTING_SECTION)
    rest = (text if start < 0 else text[:start]).rstrip() + "\n"
    section = "\n".join(checkpointing_section(rows, args, loads)) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(rest + "\n" + section)
    with stem.with_name(f"{stem.name}_checkpointing.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["arch", "method", "block", "checkpointing", "run", "peak_memory", "step"])
        for row in rows:
            for run, (peak, step) in enumerate(zip(row.peaks, row.steps, strict=True)):
                config = row.config
                writer.writerow([config.arch, config.method, config.block, config.checkpointing, run, peak, step])
    return section


# ------------------------------------------------------------------------------------------------- the report
@dataclass
class Row:
    config: Config
    footprint: Footprint
    timing: Timing
    no_grad_prefix: Timing | None = None
    alone: Timing | None = None  # steps in a fresh process of its own, with the default allocator


def _mb(count: float) -> str:
    return f"{count / 2**20:,.1f}"


def _speedup(full: float, value: float) -> str:
    return f"{full / value:.2f}x"


def _flops_with_bound(full: int, flops: int | None) -> str:
    if flops is None:
        return ""
    return f"{flops / 1e9:,.3g} ({_speedup(full, flops)})" if flops else "0 (no matrix products)"


def _share(full: float, value: float) -> str:
    return f"{100 * value / full:.2f}%" if value < 0.1 * full else f"{100 * value / full:.0f}%"


def table(rows: list[Row]) -> list[str]:
    """Markdown table of one architecture; ratios are to its full fine-tuning row."""
    full = rows[0]
    checkpoint = full.footprint.saved_bytes
    lines = [
        "| configuration | trainable params | step GFLOP (full / this) | step s (speed-up) | step CPU s (speed-up) "
        "| step alone s (speed-up) | epoch s (speed-up) | cached step GFLOP (full / this) "
        "| cached epoch 2 s (speed-up) | peak memory MB (% of full) | optimizer state MB (%) "
        "| saved MB (% of full checkpoint) | bf16 adapter MB (%) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        f, t = row.footprint, row.timing
        saved = checkpoint if row.config.method == "hand" else f.saved_bytes  # without PEFT one saves the model
        cells = [
            row.config.name,
            f"{f.trainable_params / 1e6:.3f} M ({_share(full.footprint.trainable_params, f.trainable_params)})",
            f"{f.step_flops / 1e9:,.3g} ({_speedup(full.footprint.step_flops, f.step_flops)})",
            f"{t.step:.3f} ({_speedup(full.timing.step, t.step)})",
            f"{t.step_cpu:.2f} ({_speedup(full.timing.step_cpu, t.step_cpu)})",
            f"{row.alone.step:.3f} ({_speedup(full.alone.step, row.alone.step)})" if row.alone and full.alone else "",
            f"{t.epoch:.2f} ({_speedup(full.timing.epoch, t.epoch)})",
            _flops_with_bound(full.footprint.step_flops, f.cached_step_flops),
            f"{t.cached_epoch:.3f} ({_speedup(full.timing.cached_epoch, t.cached_epoch)})" if t.cached_epoch else "",
            f"{_mb(f.peak_memory)} ({_share(full.footprint.peak_memory, f.peak_memory)})",
            f"{_mb(f.optimizer_bytes)} ({_share(full.footprint.optimizer_bytes, f.optimizer_bytes)})",
            f"{_mb(saved)} ({_share(checkpoint, saved)})",
            f"{_mb(f.saved_bf16_bytes)} ({_share(checkpoint, f.saved_bf16_bytes)})" if f.saved_bf16_bytes else "",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def overhead(rows: list[Row]) -> list[str]:
    """Surgical (through get_peft_model) against hand-written freezing of the same block, and the no_grad prefix."""
    hand = {row.config.block: row for row in rows if row.config.method == "hand"}
    lines = [
        "| block | step: surgical / hand-written | step CPU: surgical / hand-written | peak memory: surgical / "
        "hand-written (MB more) | step: no_grad prefix / plain autograd |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        other = hand.get(row.config.block)
        if row.config.method != "surgical" or (other is None and row.no_grad_prefix is None):
            continue
        cells = [f"`{row.config.block}`", "", "", ""]
        if other is not None:
            extra = row.footprint.peak_memory - other.footprint.peak_memory
            cells[1:] = [
                _paired_spread(row.timing.steps, other.timing.steps),
                _paired_spread(row.timing.cpu, other.timing.cpu),
                f"{row.footprint.peak_memory / other.footprint.peak_memory:.3f} ({_mb(extra)})",
            ]
        no_grad = row.no_grad_prefix
        if no_grad is not None:
            cells.append(_paired_spread(no_grad.steps, row.timing.steps))
        else:
            cells.append("")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def targets(rows: list[Row]) -> list[str]:
    """The issue's targets (ResNet-50, ratios to full fine-tuning) against what was measured."""
    by_key = {(row.config.method, row.config.block): row for row in rows}
    full = by_key[("full", None)]
    lines = []

    def check(text: str, value: float | None, limit: float, at_least: bool, unit: str, note: str = "") -> None:
        if value is None:
            lines.append(f"- {text}: not measured in this run")
            return
        holds = value >= limit if at_least else value <= limit
        lines.append(f"- {text}: {value:.2f}{unit}{note} -> {'holds' if holds else 'MISSED'}")

    for block, limit in (("head", 2.8), ("stage4", 2.5), ("stage1", 1.5)):
        row = by_key.get(("surgical", block))
        value = row and full.timing.step / row.timing.step
        note = f" (CPU time: {full.timing.step_cpu / row.timing.step_cpu:.2f}x)" if row else ""
        check(f"`{block}` step >= {limit}x faster, interleaved", value, limit, True, "x", note)
        if row and row.alone and full.alone:
            value = full.alone.step / row.alone.step
            note = f" (CPU time: {full.alone.step_cpu / row.alone.step_cpu:.2f}x)"
            check(f"`{block}` step >= {limit}x faster, each alone", value, limit, True, "x", note)
    for block in ("head", "stage4"):
        row = by_key.get(("surgical", block))
        value = row and row.timing.cached_epoch and full.timing.cached_epoch / row.timing.cached_epoch
        flops = row and row.footprint.cached_step_flops
        note = f" (FLOPs: {full.footprint.step_flops / flops:.2f}x fewer)" if flops else ""
        check(f"cached `{block}` epoch 2 >= 10x faster", value, 10, True, "x", note)
    row = by_key.get(("surgical", "head"))
    value = row and 100 * row.footprint.peak_memory / full.footprint.peak_memory
    check("`head` peak memory <= 35% of full", value, 35, False, "%")
    row = by_key.get(("surgical", "stage1"))
    value = row and 100 * row.footprint.saved_bytes / full.footprint.saved_bytes
    check("`stage1` adapter <= 1.1% of the full checkpoint", value, 1.1, False, "%")
    value = row and 100 * row.footprint.saved_bf16_bytes / full.footprint.saved_bytes
    check("`stage1` bfloat16 adapter <= 0.6% of the full checkpoint", value, 0.6, False, "%")
    for row in rows:
        other = by_key.get(("hand", row.config.block))
        if row.config.method != "surgical" or other is None:
            continue
        name = f"`{row.config.block}` surgical"
        value = 100 * (_paired(row.timing.steps, other.timing.steps) - 1)
        note = f" (CPU time: {100 * (_paired(row.timing.cpu, other.timing.cpu) - 1):+.1f}%)"
        check(f"{name} step at most 5% slower than hand-written", value, 5, False, "%", note)
        value = 100 * (row.footprint.peak_memory / other.footprint.peak_memory - 1)
        check(f"{name} peak memory at most 5% above hand-written", value, 5, False, "%")
    return lines


def write_report(rows: list[Row], args: argparse.Namespace, seconds: float, loads: list[float]) -> str:
    """The markdown report, also written with a CSV of the raw numbers to benchmarks/results/."""
    processor = torch.cuda.get_device_name() if args.device == "cuda" else platform.machine()
    lines = [
        f"# Efficiency benchmark ({args.device}{', quick' if args.quick else ''})",
        "",
        f"`python benchmarks/efficiency.py {' '.join(sys.argv[1:])}`: {seconds / 60:.1f} min; torch "
        f"{torch.__version__}, {args.threads} threads, {processor}, {os.cpu_count()} cores; batch {BATCH_SIZE}, "
        f"AdamW, random init. Load average (1 min) while it ran: {min(loads):.1f} to {max(loads):.1f}.",
        "",
        "Speed-ups are full fine-tuning's time over the configuration's; percentages are of full fine-tuning's "
        "figure. Steps are timed interleaved (one step of each configuration in turn, in one process, whose "
        "allocator keeps freed memory for reuse as PyTorch's CUDA allocator does); step CPU is the process CPU time "
        "of a step, less sensitive to other load on the machine. Step alone (ResNet-50 on CPU): the median step of "
        "the configuration run by itself in a fresh process with glibc's default allocator, as a user runs it; "
        "glibc then returns large activation buffers to the system and faults them in again every step, which "
        "costs the configurations with more activations more. GFLOP are those of one step (forward and backward) "
        "as `torch.utils.flop_counter` counts them (matrix products and convolutions): full fine-tuning's count over "
        "a configuration's is the speed-up that equal arithmetic throughput would give. Peak memory is measured in a "
        "fresh process per configuration: the peak RSS (CUDA: allocated memory) above what the process held after "
        "building the model and the data, with glibc's malloc returning freed memory at once (a fixed mmap threshold, "
        "the heap trimmed before the baseline): the memory training holds, not what the allocator happens to keep. "
        "The cached epoch is the second epoch with `FeatureCache` (the first fills it); full fine-tuning's row gives "
        "its own epoch timed in the same rounds, the reference for the cached speed-ups. Hand-written freezing saves "
        "the full checkpoint.",
    ]
    for arch, title in ARCHS.items():
        arch_rows = [row for row in rows if row.config.arch == arch]
        if not arch_rows:
            continue
        schedule = SCHEDULES["quick" if args.quick else arch]
        lines += [
            "",
            f"## {title}",
            "",
            f"Step: median of the {schedule.epoch} steps of an epoch, after {schedule.warmup} warm-up rounds.",
            "",
            *table(arch_rows),
            "",
            "Surgical through `get_peft_model` against hand-written `requires_grad` freezing of the same block, and "
            "the frozen prefix run under `torch.no_grad()` against plain autograd: step times are the median over "
            "rounds of the ratio of two steps run one after the other (in alternating order), with the quartiles of "
            "those ratios in brackets.",
            "",
            *overhead(arch_rows),
        ]
        if arch == "resnet50" and not args.quick:  # the targets are about the real ResNet-50
            lines += ["", "Targets (ResNet-50, ratios to full fine-tuning):", "", *targets(arch_rows)]
    report = "\n".join(lines) + "\n"
    stem = RESULTS / f"efficiency_{args.device}{'_quick' if args.quick else ''}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".md").write_text(report + _checkpointing_section_of(stem.with_suffix(".md")))
    records = []
    for row in rows:
        timing = {key: value for key, value in asdict(row.timing).items() if key not in ("steps", "cpu")}
        timing |= {"step": row.timing.step, "step_cpu": row.timing.step_cpu, "epoch": row.timing.epoch}
        no_grad = {"step_no_grad_prefix": row.no_grad_prefix.step if row.no_grad_prefix else None}
        records.append({**asdict(row.config), **asdict(row.footprint), **timing, **no_grad})
    with stem.with_suffix(".csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps: a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    for arch in ARCHS:
        parser.add_argument(
            f"--{arch}-blocks", nargs="+", help=f"blocks to tune (default: {' '.join(BLOCKS[arch])}; quick: fewer)"
        )
    parser.add_argument("--checkpointing", action="store_true", help="only the gradient checkpointing rows")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration with --checkpointing")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.checkpointing:
        loads = [os.getloadavg()[0]]

        def report(rows: list[CheckpointingRow]) -> None:  # after every round: a stopped run keeps what it measured
            loads.append(os.getloadavg()[0])
            print(write_checkpointing_report(rows, args, loads), file=sys.stderr)

        measure_checkpointing("vit_b16", args, device, report)
        return

    start, loads, rows = time.perf_counter(), [os.getloadavg()[0]], []
    for arch in args.arch:
        blocks = getattr(args, f"{arch}_blocks") or (QUICK_BLOCKS if args.quick else BLOCKS)[arch]
        with_prefix = set(blocks) - {FIRST_BLOCK[arch]}
        hand, no_grad, cached = (
            (set(blocks), with_prefix, with_prefix) if args.quick else (HAND[arch], NO_GRAD[arch], CACHED[arch])
        )
        configs = [Config(arch, "full")]
        configs += [Config(arch, "surgical", block) for block in blocks]
        configs += [Config(arch, "hand", block) for block in blocks if block in hand]
        configs.append(Config(arch, "lora"))
        footprints = [
            in_fresh_process(
                args.threads, device, measure_footprint, config, _is_cached(config, cached), args.quick, device
            )
            for config in tqdm(configs, desc=f"{arch}: memory, one process each")
        ]
        loads.append(os.getloadavg()[0])
        print(f"{arch}: timing {len(configs)} configurations, interleaved", file=sys.stderr)
        schedule = SCHEDULES["quick" if args.quick else arch]
        timings = in_fresh_process(
            args.threads, device, measure_times, configs, no_grad, cached, schedule, args.quick, device
        )
        loads.append(os.getloadavg()[0])
        alone: list[Timing | None] = [None] * len(configs)
        if device.type == "cpu" and arch in ALONE:
            alone = [
                in_fresh_process(args.threads, device, measure_fresh_steps, config, schedule, args.quick, device)
                for config in tqdm(configs, desc=f"{arch}: steps alone, one process each")
            ]
            loads.append(os.getloadavg()[0])
        rows += [
            Row(config, footprint, timings[config.name], timings.get(f"{config.name} no_grad prefix"), steps)
            for config, footprint, steps in zip(configs, footprints, alone, strict=True)
        ]
        report = write_report(rows, args, time.perf_counter() - start, loads)  # rewritten after each architecture
    print(report)


if __name__ == "__main__":
    main()
