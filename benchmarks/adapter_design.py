"""The tuner's design, measured: tuning the block's own weights in place against adapter-owned deltas.

PEFT's own methods train parameters that belong to the adapter (LoRA's `lora_A.<adapter>`, or for full-weight methods
a copy of the weights) and compose them onto the frozen base weights in the forward pass. This project's tuner
instead trains the tuned block's own parameters in place (it only sets `requires_grad`) and keeps a CPU snapshot of
the base, so that a step costs what hand-written freezing costs. This script measures both against hand-written
`requires_grad` freezing of the same block (issue 11, item 2: within 5% in step time and peak memory):

- `hand`: `requires_grad` set by hand on the block's parameters, frozen BatchNorm layers in eval mode;
- `surgical`: `get_peft_model(model, SurgicalConfig(block=...))`, this project's tuner;
- `owned`: every tensor of the block gets an adapter-owned delta (zeros, trainable), composed onto the frozen base in
  the forward pass as `weight = base + delta` (a `torch.nn.utils.parametrize` parametrisation: the same arithmetic as
  a wrapping tuner layer), the rest frozen as in `hand`.

Peak memory is measured in a fresh process per configuration (`efficiency.Memory`: the peak RSS above what the
process held once the model and the data were built, so the tuner's snapshot and the deltas count); step times are
interleaved in one process, one step of each configuration in turn, and given as the median of the per-round ratios
to `hand` (paired, so that other load on the machine cancels), with process CPU time beside the wall clock.

Usage:
    python benchmarks/adapter_design.py            # ResNet-50 and ViT-B/16 shapes, batch 8 at 224 (about 15 min)
    python benchmarks/adapter_design.py --quick    # tiny models: a smoke test
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from efficiency import ARCHS, Memory, build_model, in_fresh_process, keep_freed_memory, timed  # a sibling script
from peft import get_peft_model
from torch import nn
from torch.nn.utils import parametrize
from tqdm.auto import tqdm

import surgical_peft
from surgical_peft.blocks import ALL, is_under

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("hand", "surgical", "owned")
BLOCKS = {"resnet50": ["stage1", "stage4", ALL], "vit_b16": ["layer1", "layer12", ALL]}
QUICK_BLOCKS = {"resnet50": ["stage1", ALL], "vit_b16": ["layer1", ALL]}
BATCH_SIZE = 8
WARMUP, ROUNDS = 1, 6


class PlusDelta(nn.Module):
    """`base + delta`: an adapter-owned delta (zeros at first), composed onto a frozen base tensor in the forward."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.delta = nn.Parameter(torch.zeros_like(like))

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        return base + self.delta


def _block_paths(model: nn.Module, block: str) -> tuple[str, ...]:
    blocks = surgical_peft.list_blocks(model)
    return ("",) if block == ALL else tuple(blocks[block])


def _freeze_except(model: nn.Module, tuned: tuple[str, ...]) -> None:
    """Freeze every parameter outside `tuned`, with frozen BatchNorm layers in eval mode (the tuner's rule)."""
    model.train()
    for path, parameter in model.named_parameters():
        parameter.requires_grad_(is_under(path, tuned) or tuned == ("",))
    for path, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not (is_under(path, tuned) or tuned == ("",)):
            module.eval()


def _own_deltas(model: nn.Module, tuned: tuple[str, ...]) -> None:
    """Give every parameter under `tuned` an adapter-owned delta; the base tensors themselves stay frozen."""
    _freeze_except(model, tuned)
    for path in tuned:
        for module in list(model.get_submodule(path).modules()):
            for name, parameter in list(module.named_parameters(recurse=False)):
                parameter.requires_grad_(False)
                parametrize.register_parametrization(module, name, PlusDelta(parameter), unsafe=True)


@dataclass(frozen=True)
class Config:
    arch: str
    method: str
    block: str

    @property
    def name(self) -> str:
        return f"{self.method} `{self.block}`"


class Trainee:
    """A model set up for a configuration, with AdamW over what trains."""

    def __init__(self, config: Config, model: nn.Module) -> None:
        if config.method == "surgical":
            model = get_peft_model(model, surgical_peft.SurgicalConfig(block=config.block)).train()
        elif config.method == "hand":
            _freeze_except(model, _block_paths(model, config.block))
        else:
            _own_deltas(model, _block_paths(model, config.block))
        self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=1e-4)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.model(pixel_values=batch[0], labels=batch[1]).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def make_batches(count: int, quick: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    size, generator = (32 if quick else 224), torch.Generator().manual_seed(1)
    return [
        (torch.randn(BATCH_SIZE, 3, size, size, generator=generator), torch.randint(0, 2, (BATCH_SIZE,)))
        for _ in range(count)
    ]


def peak_memory(config: Config, quick: bool) -> tuple[int, int]:
    """(trainable parameters, peak bytes of setting up and two training steps, above the built model and data), in
    this process (call in a fresh one)."""
    memory = Memory(torch.device("cpu"))
    batches = make_batches(2, quick)
    model = build_model(config.arch, quick, torch.device("cpu"))
    memory.reset()
    trainee = Trainee(config, model)
    for batch in batches:
        trainee.step(batch)
    return sum(p.numel() for p in trainee.trainable), memory.peak()


def step_times(configs: list[Config], quick: bool) -> dict[Config, tuple[list[float], list[float]]]:
    """Wall and CPU seconds of each configuration's steps, interleaved (the order reversed every round)."""
    keep_freed_memory(torch.device("cpu"))
    trainees = {config: Trainee(config, build_model(config.arch, quick, torch.device("cpu"))) for config in configs}
    batches = make_batches(ROUNDS, quick)
    wall: dict[Config, list[float]] = {config: [] for config in configs}
    cpu: dict[Config, list[float]] = {config: [] for config in configs}
    for round_ in tqdm(range(WARMUP + ROUNDS), desc="  rounds", leave=False):
        for config in configs if round_ % 2 else configs[::-1]:
            if round_ < WARMUP:
                trainees[config].step(batches[0])
                continue
            with timed(torch.device("cpu"), wall[config], cpu[config]):
                trainees[config].step(batches[round_ - WARMUP])
    return {config: (wall[config], cpu[config]) for config in configs}


def _paired(values: list[float], reference: list[float]) -> str:
    ratios = [value / other for value, other in zip(values, reference, strict=True)]
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{statistics.median(ratios):.3f} ({low:.3f}-{high:.3f})"


def report(arch: str, blocks: list[str], memory: dict, times: dict) -> list[str]:
    lines = [
        f"## {ARCHS[arch]}",
        "",
        "| block | method | trainable params | peak memory MB (/ hand) | step s | step / hand | step CPU / hand |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for block in blocks:
        hand = Config(arch, "hand", block)
        for method in METHODS:
            config = Config(arch, method, block)
            params, peak = memory[config]
            wall, cpu = times[config]
            lines.append(
                f"| `{block}` | {method} | {params / 1e6:.3f} M | {peak / 2**20:,.1f} ({peak / memory[hand][1]:.3f}) "
                f"| {statistics.median(wall):.3f} | {_paired(wall, times[hand][0])} | {_paired(cpu, times[hand][1])} |"
            )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models: a smoke test")
    parser.add_argument("--arch", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    args = parser.parse_args(argv)
    start, loads, sections = time.perf_counter(), [os.getloadavg()[0]], []
    for arch in args.arch:
        blocks = (QUICK_BLOCKS if args.quick else BLOCKS)[arch]
        configs = [Config(arch, method, block) for block in blocks for method in METHODS]
        memory = {
            config: in_fresh_process(2, torch.device("cpu"), peak_memory, config, args.quick)
            for config in tqdm(configs, desc=f"{arch}: memory, one process each")
        }
        times = in_fresh_process(2, torch.device("cpu"), step_times, configs, args.quick)
        loads.append(os.getloadavg()[0])
        sections += report(arch, blocks, memory, times)
    header = [
        "# The tuner's design: in place against adapter-owned deltas (cpu)",
        "",
        f"`python benchmarks/adapter_design.py {' '.join(argv or sys.argv[1:])}`: "
        f"{(time.perf_counter() - start) / 60:.1f} min; torch {torch.__version__}, 2 threads, {platform.machine()}, "
        f"{os.cpu_count()} cores; batch {BATCH_SIZE}, AdamW, random init; median of {ROUNDS} interleaved steps after "
        f"{WARMUP} warm-up round(s). Load average (1 min) while it ran: {min(loads):.1f} to {max(loads):.1f}.",
        "",
        "Ratios in brackets are the quartiles of the per-round ratios to `hand` (hand-written `requires_grad` "
        "freezing of the same block). Peak memory: fresh process per configuration, above the model and data.",
        "",
    ]
    text = "\n".join(header + sections)
    if not args.quick:
        (RESULTS / "adapter_design_cpu.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
