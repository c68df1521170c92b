"""Serving surgical adapters: `fan_out`, mixed-adapter batches, PEFT LoRA's mixed batches, compiled against eager.

For a ResNet-50-shaped model (`ResNetConfig()`) and a ViT-B/16-shaped one (`ViTConfig()`), randomly initialised, in
eval mode under `torch.no_grad()`, with every adapter's deltas random (`init_weights=False`), this measures (issue 22,
item 6):

- (a) `fan_out` over K in {2, 8} adapters of the head, the last stage (`stage4`, `layer12`) and the first
  (`stage1`, `layer1`), against K separate forward passes (`set_adapter`, then the batch): the speed-up, and its ratio
  to the FLOP bound K·F / (F + (K-1)·F_suffix), F the FLOPs of one forward pass and F_suffix those from the tuned block
  on (both counted with `torch.utils.flop_counter`);
- (b) a mixed batch of 32 over K in {1, 4, 8, 16} `stage1` (`layer1`) adapters against one adapter's batch of 32, and
  against switching adapters per sub-batch (`set_adapter`, then that adapter's rows); the same mixed batch grouped at
  each tuned module rather than at the block (the design choice `surgical_peft.serving.units` explains); and the
  memory the weights take: K merged copies of the model against one model and the adapters' stashed weights;
- (c) PEFT LoRA's own mixed batch on the same shapes (r=8 on every convolution or linear layer of the same block), as
  the peer: its mixed batch of 32 against its one adapter's batch of 32;
- (d) with `torch.compile` (inductor): one adapter's batch, a mixed batch over 4 adapters, and the number of graphs
  compiled while switching among 4 adapters on one block, against eager.

On the CPU, the script runs with `OMP_WAIT_POLICY=PASSIVE` (it restarts itself with it unless set): OpenMP's threads
then sleep while they wait instead of spinning, which on cores shared with other jobs made a ResNet-50 forward pass
take 1 to 3.7 s instead of 0.25 s. Times are the process's CPU time (`time.process_time`, both threads), which counts
only the work done, whatever else holds the cores. On CUDA they are wall time, synchronised. Each is the fastest of
`--repeats` rounds; within a round the compared functions run in turn, the order rotating. Each ratio is of times
measured side by side.

Usage:
    python benchmarks/serving.py                  # the CPU run (writes benchmarks/results/serving_cpu.md)
    python benchmarks/serving.py --quick          # tiny models: a smoke test (writes nothing unless --output)
    python benchmarks/serving.py --device cuda    # on a GPU (timings synchronised; writes serving_cuda.md)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch.utils.flop_counter import FlopCounterMode
from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification

import surgical_peft
from surgical_peft import SurgicalConfig, fan_out, list_blocks
from surgical_peft.tuner import SurgicalModel

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {"resnet50": "ResNet-50 (ResNetConfig())", "vit_b16": "ViT-B/16 (ViTConfig())"}
FAN_OUT_BLOCKS = {"resnet50": ["head", "stage4", "stage1"], "vit_b16": ["head", "layer12", "layer1"]}
QUICK_FAN_OUT_BLOCKS = {"resnet50": ["head", "stage2", "stage1"], "vit_b16": ["head", "layer2", "layer1"]}
FIRST_BLOCK = {"resnet50": "stage1", "vit_b16": "layer1"}
FAN_OUT_KS = [2, 8]
MIXED_KS = [1, 4, 8, 16]
MIXED_BATCH = 32
COMPILE_ADAPTERS = 4


def build_base(arch: str, quick: bool, image_size: int) -> nn.Module:
    """A randomly initialised model of `arch`'s shape (tiny ones with `quick`)."""
    torch.manual_seed(0)
    if arch == "resnet50":
        config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]) if quick else ResNetConfig()
        return ResNetForImageClassification(config).eval()
    sizes = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    config = ViTConfig(image_size=image_size, **(sizes if quick else {}))
    return ViTForImageClassification(config).eval()


def with_adapters(base: nn.Module, block: str, count: int, device: torch.device) -> nn.Module:
    """`base` with `count` surgical adapters `a0`, `a1`, ... on `block`, random deltas, on `device`, in eval mode."""
    model = get_peft_model(base, SurgicalConfig(block=block, init_weights=False), adapter_name="a0")
    for index in range(1, count):
        model.add_adapter(f"a{index}", SurgicalConfig(block=block, init_weights=False))
    return model.to(device).eval()


def with_lora(base: nn.Module, block: str, count: int, device: torch.device) -> nn.Module:
    """`base` with `count` LoRA adapters (r=8, random B) on every Conv2d and Linear of `block`."""
    paths = list_blocks(base)[block]
    targets = [
        name
        for name, module in base.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and any(name == p or name.startswith(p + ".") for p in paths)
    ]
    config = {"r": 8, "target_modules": targets, "init_lora_weights": False}
    model = get_peft_model(base, LoraConfig(**config), adapter_name="a0")
    for index in range(1, count):
        model.add_adapter(f"a{index}", LoraConfig(**config))
    return model.to(device).eval()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_side_by_side(functions: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, float]:
    """The fastest time of each function in seconds (CPU time on the CPU, wall time on CUDA): one warm-up call each,
    then `repeats` rounds, the order rotating."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    names = list(functions)
    for name in names:
        functions[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(repeats):
        shift = round_number % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = clock()
            functions[name]()
            synchronize(device)
            times[name].append(clock() - start)
    return {name: min(values) for name, values in times.items()}


def count_flops(model: nn.Module, pixel_values: torch.Tensor, stop_at: nn.Module | None = None) -> int:
    """FLOPs of a forward pass, or of the part before `stop_at` runs."""

    class Stop(Exception):
        pass

    def stop(*_: Any) -> None:
        raise Stop

    handle = stop_at.register_forward_pre_hook(stop) if stop_at is not None else None
    counter = FlopCounterMode(display=False)
    try:
        with counter, contextlib.suppress(Stop):
            model(pixel_values=pixel_values)
    finally:
        if handle is not None:
            handle.remove()
    return counter.get_total_flops()


def flop_bound(model: nn.Module, pixel_values: torch.Tensor, count: int) -> float:
    """K·F / (F + (K-1)·F_suffix) for the active adapter's earliest tuned block."""
    tuner = model.base_model
    first = tuner.model.get_submodule(tuner.adapter_targets(model.active_adapter)[0])
    total = count_flops(model, pixel_values)
    suffix = total - count_flops(model, pixel_values, stop_at=first)
    return count * total / (total + (count - 1) * suffix)


@torch.no_grad()
def measure_fan_out(arch: str, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    rows = []
    blocks = QUICK_FAN_OUT_BLOCKS[arch] if args.quick else FAN_OUT_BLOCKS[arch]
    pixel_values = torch.randn(args.fan_out_batch, 3, args.image_size, args.image_size, device=device)
    for block in blocks:
        model = with_adapters(build_base(arch, args.quick, args.image_size), block, max(FAN_OUT_KS), device)
        for count in FAN_OUT_KS:
            names = [f"a{index}" for index in range(count)]

            def separately(model: nn.Module = model, names: list[str] = names) -> None:
                for name in names:
                    model.set_adapter(name)
                    model(pixel_values=pixel_values)

            def shared(model: nn.Module = model, names: list[str] = names) -> None:
                fan_out(model, names, pixel_values=pixel_values)

            times = time_side_by_side({"separate": separately, "fan_out": shared}, args.repeats, device)
            bound = flop_bound(model, pixel_values, count)
            speedup = times["separate"] / times["fan_out"]
            target = "yes" if speedup >= 0.8 * bound else "**no**"
            timings = [_ms(times["separate"]), _ms(times["fan_out"]), f"{speedup:.2f}x"]
            rows.append(
                [_label(arch, args), block, str(count), *timings, f"{bound:.2f}x", f"{speedup / bound:.2f}", target]
            )
            print(" | ".join(rows[-1]), flush=True)
    return rows


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _stashed_bytes(model: nn.Module) -> int:
    """The bytes of the inactive adapters' weights the tuner keeps (on the CPU), read through its accessor."""
    tuner = model.base_model
    return sum(
        tensor.numel() * tensor.element_size()
        for layer in tuner.surgical_layers.values()
        for name in layer.adapters
        if (name,) != layer.loaded
        for tensor in layer.weights(name).values()
    )


@contextlib.contextmanager
def grouped_per_module() -> Iterator[None]:
    """Mixed batches grouped at each tuned module instead of each block: with no block known, the units are the
    modules that own tuned tensors (`surgical_peft.serving.units`)."""
    original = SurgicalModel.adapter_targets
    SurgicalModel.adapter_targets = lambda self, adapter_name: []
    try:
        yield
    finally:
        SurgicalModel.adapter_targets = original


@torch.no_grad()
def measure_mixed(arch: str, args: argparse.Namespace, device: torch.device) -> tuple[list[list[str]], list[str]]:
    block = FIRST_BLOCK[arch]
    model = with_adapters(build_base(arch, args.quick, args.image_size), block, max(MIXED_KS), device)
    pixel_values = torch.randn(MIXED_BATCH, 3, args.image_size, args.image_size, device=device)
    rows = []
    for count in MIXED_KS:
        names = [f"a{index % count}" for index in range(MIXED_BATCH)]

        def switching(names: list[str] = names) -> None:
            for name in dict.fromkeys(names):
                model.set_adapter(name)
                model(pixel_values=pixel_values[[i for i, other in enumerate(names) if other == name]])
            model.set_adapter("a0")

        def mixed(names: list[str] = names) -> None:
            model(pixel_values=pixel_values, adapter_names=names)

        def per_module(names: list[str] = names) -> None:
            with grouped_per_module():
                model(pixel_values=pixel_values, adapter_names=names)

        functions = {"one": lambda: model(pixel_values=pixel_values), "mixed": mixed, "switching": switching}
        if count == max(MIXED_KS):
            functions["per module"] = per_module
        times = time_side_by_side(functions, args.repeats, device)
        speed = times["one"] / times["mixed"]
        per_module = f"{times['one'] / times['per module']:.2f}x" if "per module" in times else ""
        switching_speed = f"{times['switching'] / times['mixed']:.2f}x"
        target = "yes" if speed >= 0.85 else "**no**"
        timings = [_ms(times["one"]), _ms(times["mixed"]), f"{speed:.2f}x", _ms(times["switching"]), switching_speed]
        rows.append([_label(arch, args), str(count), *timings, per_module, target])
        print(" | ".join(rows[-1]), flush=True)
    count = max(MIXED_KS)
    merged = count * _weight_bytes(model.base_model.model)
    memory = [
        _label(arch, args),
        str(count),
        _mb(merged),
        _mb(_weight_bytes(model.base_model.model) + _stashed_bytes(model)),
    ]
    return rows, memory


@torch.no_grad()
def measure_lora(arch: str, args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    block = FIRST_BLOCK[arch]
    model = with_lora(build_base(arch, args.quick, args.image_size), block, max(MIXED_KS), device)
    pixel_values = torch.randn(MIXED_BATCH, 3, args.image_size, args.image_size, device=device)
    rows = []
    for count in MIXED_KS:
        names = [f"a{index % count}" for index in range(MIXED_BATCH)]
        times = time_side_by_side(
            {
                "one": lambda: model(pixel_values=pixel_values),
                "mixed": lambda names=names: model(pixel_values=pixel_values, adapter_names=names),
            },
            args.repeats,
            device,
        )
        speed = times["one"] / times["mixed"]
        rows.append([_label(arch, args), str(count), _ms(times["one"]), _ms(times["mixed"]), f"{speed:.2f}x"])
        print(" | ".join(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def measure_compiled(arch: str, args: argparse.Namespace, device: torch.device) -> list[str]:
    torch._dynamo.reset()
    block = FIRST_BLOCK[arch]
    model = with_adapters(build_base(arch, args.quick, args.image_size), block, COMPILE_ADAPTERS, device)
    counter = CompileCounterWithBackend("eager" if args.quick else "inductor")
    compiled = torch.compile(model, backend=counter)
    pixel_values = torch.randn(MIXED_BATCH, 3, args.image_size, args.image_size, device=device)
    names = [f"a{index % COMPILE_ADAPTERS}" for index in range(MIXED_BATCH)]
    start = time.perf_counter()
    compiled(pixel_values=pixel_values)
    first_call = time.perf_counter() - start
    graphs = counter.frame_count
    for index in range(COMPILE_ADAPTERS):
        model.set_adapter(f"a{index}")
        compiled(pixel_values=pixel_values)
    recompiled = counter.frame_count - graphs
    model.set_adapter("a0")
    times = time_side_by_side(
        {
            "eager": lambda: model(pixel_values=pixel_values),
            "compiled": lambda: compiled(pixel_values=pixel_values),
            "eager mixed": lambda: model(pixel_values=pixel_values, adapter_names=names),
            "compiled mixed": lambda: compiled(pixel_values=pixel_values, adapter_names=names),
        },
        args.repeats,
        device,
    )
    row = [_label(arch, args), f"{first_call:.0f} s", str(recompiled), _ms(times["eager"]), _ms(times["compiled"])]
    row += [f"{times['eager'] / times['compiled']:.2f}x", _ms(times["eager mixed"]), _ms(times["compiled mixed"])]
    row += [f"{times['eager mixed'] / times['compiled mixed']:.2f}x", str(counter.frame_count - graphs - recompiled)]
    print(" | ".join(row), flush=True)
    return row


def _label(arch: str, args: argparse.Namespace) -> str:
    return f"tiny {arch}" if args.quick else ARCHS[arch]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _mb(count: float) -> str:
    return f"{count / 2**20:.0f} MB"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *(f"| {' | '.join(row)} |" for row in rows)]


def _load() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    threads = f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, {threads}"


def report(sections: dict[str, Any], args: argparse.Namespace, device: torch.device, loads: list[str]) -> str:
    lines = [
        "# Serving surgical adapters",
        "",
        f"`{' '.join(['python benchmarks/serving.py', *sys.argv[1:]])}`",
        f"on {_machine(device)}, surgical-peft {surgical_peft.__version__}; load average (1/5/15 min) before: "
        f"{loads[0]}, after: {loads[1]} (other jobs shared the machine). Images {args.image_size}x{args.image_size}, "
        f"eval mode, no gradients, random deltas; {'CPU' if device.type == 'cpu' else 'wall'} time, the fastest of "
        f"{args.repeats} rounds run side by side.",
        "",
        f"## (a) fan_out: one batch of {args.fan_out_batch} through K adapters of one block",
        "",
        "Speed-up: K separate forward passes (`set_adapter`, forward) over one `fan_out` call. Bound: K·F / (F + "
        "(K-1)·F_suffix), with F the forward pass's FLOPs and F_suffix those from the tuned block on. Target: at "
        "least 0.8 of the bound.",
        "",
        *_table(
            ["model", "block", "K", "K forwards", "fan_out", "speed-up", "FLOP bound", "ratio", ">= 0.8"],
            sections["fan_out"],
        ),
        "",
        f"## (b) a mixed batch of {MIXED_BATCH} over K first-block adapters",
        "",
        "Speed: one adapter's batch of 32 (the model as it is) over the mixed batch (`adapter_names`, K names in "
        "turn). Switching: `set_adapter` and a forward pass per adapter on its rows, over the mixed batch. Per "
        "module: the same mixed batch cut and joined around each tuned module instead of each block (speed against "
        "one adapter's batch). Target: at least 0.85.",
        "",
        *_table(
            ["model", "K", "one adapter", "mixed", "speed", "switching", "mixed's speed-up", "per module", ">= 0.85"],
            sections["mixed"],
        ),
        "",
        "Weights in memory for K adapters: K merged copies of the model, against one model with the K adapters (the "
        "tuner's stashed weights of the inactive ones, on the CPU; the base snapshot is memory-mapped from disk).",
        "",
        *_table(["model", "K", "K merged copies", "one model + K adapters"], sections["memory"]),
        "",
        f"## (c) PEFT LoRA's own mixed batch of {MIXED_BATCH} (r=8 on the first block's convolutions, linear layers)",
        "",
        *_table(["model", "K", "one adapter", "mixed", "speed"], sections["lora"]),
        "",
    ]
    if sections["compiled"]:
        lines += [
            "## (d) torch.compile (inductor) against eager",
            "",
            f"First call: compiling included. Recompiled: graphs compiled while switching among {COMPILE_ADAPTERS} "
            f"adapters on one block with `set_adapter`. Mixed: a batch of {MIXED_BATCH} over {COMPILE_ADAPTERS} "
            "adapters (tuned blocks eager, a graph break around each); its graphs: those the first mixed batch "
            "compiled (later ones with other names compile none).",
            "",
            *_table(
                [
                    "model",
                    "first call (wall)",
                    "recompiled",
                    "eager",
                    "compiled",
                    "speed-up",
                    "eager mixed",
                    "compiled mixed",
                    "speed-up",
                    "mixed's graphs",
                ],
                sections["compiled"],
            ),
            "",
        ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--quick", action="store_true", help="tiny models, one round: a smoke test")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS), help="the models")
    parser.add_argument("--image-size", type=int, default=None, help="image side (default: 224 on cuda, 128 on cpu)")
    parser.add_argument("--fan-out-batch", type=int, default=8, help="the batch of (a)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds per timing (default: 3; 1 with --quick)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--no-compile", action="store_true", help="skip (d)")
    parser.add_argument("--output", type=Path, default=None, help="the report (default: results/serving_DEVICE.md)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    for name in ("image_size", "fan_out_batch", "repeats", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    args.image_size = args.image_size or (32 if args.quick else 224 if args.device == "cuda" else 128)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.output is None and not args.quick:
        args.output = RESULTS / f"serving_{args.device}.md"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu" and "OMP_WAIT_POLICY" not in os.environ:  # read when OpenMP loads: start again with it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    loads = [_load()]
    sections: dict[str, Any] = {"fan_out": [], "mixed": [], "memory": [], "lora": [], "compiled": []}
    for arch in args.archs:
        sections["fan_out"] += measure_fan_out(arch, args, device)
        mixed, memory = measure_mixed(arch, args, device)
        sections["mixed"] += mixed
        sections["memory"].append(memory)
        sections["lora"] += measure_lora(arch, args, device)
        if not args.no_compile:
            sections["compiled"].append(measure_compiled(arch, args, device))
    loads.append(_load())
    text = report(sections, args, device, loads)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
        print(f"wrote {args.output}")
    print(text)


if __name__ == "__main__":
    main()
