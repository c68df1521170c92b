"""Surgical fine-tuning on a quantized frozen base: peak memory, step time and accuracy, against a full-precision base.

The base is loaded quantized as PEFT's guides do it, through transformers' `from_pretrained(...,
quantization_config=...)`: bitsandbytes 8-bit (`BitsAndBytesConfig(load_in_8bit=True)`) and torchao's int8
weight-only (`TorchAoConfig(Int8WeightOnlyConfig())`; for transformers' ResNet, which TorchAoConfig cannot load,
`torchao.quantization.quantize_` on the loaded model), against float32. Both quantize `nn.Linear` layers only. Then
`get_peft_model(model, SurgicalConfig(block=...))`: the tuned block trains in float32, the rest stays quantized.

- Memory and time: a ViT-B/16 shape (`ViTConfig()`, block `layer12`) and a ResNet-50 shape (`ResNetConfig()`, block
  `stage4`), random weights saved once with `save_pretrained`, batch 8 at 224x224, AdamW. Memory: in a fresh
  process per configuration, above what the process held before loading (so the base's own weights count, which is
  what quantization saves): the peak RSS while loading and setting up the adapter, the RSS held then once the
  memory-mapped checkpoint's pages are given back (`page_out`), and the peak RSS over two training steps (in which a
  float32 model reads its weights back); with the bytes of the loaded model's tensors beside them. Step time: the
  configurations of an architecture in one process, one step of each in turn, the median step and the median of the
  per-round ratios to float32 (so that other load on the machine cancels).
- Accuracy: the demo's target (digits under contrast at severity 5, 150 labelled images, learning rate picked on 100
  more from the demo's grid, tested on 649): the demo's ResNet tuned at `stage1`, and the small ViT of
  `benchmarks/lora_export.py` tuned at `layer1`, on each base; and the adapter tuned on the quantized base loaded onto
  the float32 checkpoint with `verify_base=False` (the fingerprint refuses it otherwise).

Needs `pip install "surgical-peft[quantization]"`. Writes `benchmarks/results/quantized_base.md`.

Usage:
    python benchmarks/quantized_base.py           # about 25 minutes on 2 cores
    python benchmarks/quantized_base.py --quick   # tiny models, a few steps: a smoke test
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from efficiency import ARCHS, Memory, build_model, in_fresh_process, keep_freed_memory, make_batches, timed  # siblings
from lora_export import accuracy, digits_vit, target_splits, tune
from peft import PeftModel, get_peft_model
from torch import nn
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    AutoModelForImageClassification,
    BitsAndBytesConfig,
    ResNetForImageClassification,
    TorchAoConfig,
    ViTForImageClassification,
)

import surgical_peft
from surgical_peft.experiments.demo import source_model
from surgical_peft.tuner.quantized import quantization_of

RESULTS = Path(__file__).resolve().parent / "results"
BLOCK = {"vit_b16": "layer12", "resnet50": "stage4"}
QUICK_BLOCK = {"vit_b16": "layer4", "resnet50": "stage4"}  # (the tiny ViT has 4 layers)
BATCH_SIZE, MEMORY_STEPS, WARMUP, ROUNDS = 8, 2, 1, 5
_MADV_PAGEOUT = 21  # Linux 5.4+


def _torchao_int8() -> Any:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


def _torchao(path: Path, model_class: type) -> nn.Module:
    # transformers' TorchAoConfig asks the model for its input embeddings, which its ResNet does not implement
    # (NotImplementedError): there, torchao's own `quantize_` on the loaded model, which is what TorchAoConfig runs.
    if AutoConfig.from_pretrained(path).model_type != "resnet":
        return model_class.from_pretrained(path, quantization_config=TorchAoConfig(_torchao_int8()), device_map="cpu")
    from torchao.quantization import quantize_

    model = model_class.from_pretrained(path)
    quantize_(model, _torchao_int8())
    return model


BASES: dict[str, Callable[[Path, type], nn.Module]] = {
    "float32": lambda path, model_class: model_class.from_pretrained(path),
    "bitsandbytes 8-bit": lambda path, model_class: model_class.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map="cpu"
    ),
    "torchao int8 weight-only": _torchao,
}


def load(path: Path, base: str, model_class: type = AutoModelForImageClassification) -> nn.Module:
    """The checkpoint at `path`, loaded as `base` says."""
    return BASES[base](path, model_class)


def tensor_bytes(model: nn.Module) -> int:
    """The bytes of the model's tensors as loaded (quantized storage and scales included)."""
    total = 0
    for tensor in model.state_dict().values():
        subclass = quantization_of(tensor) and hasattr(tensor, "__tensor_flatten__")  # torchao: its inner tensors
        parts = [getattr(tensor, name) for name in tensor.__tensor_flatten__()[0]] if subclass else [tensor]
        total += sum(part.numel() * part.element_size() for part in parts)
    return total


class Trainee:
    def __init__(self, path: Path, base: str, block: str) -> None:
        self.model = get_peft_model(load(path, base), surgical_peft.SurgicalConfig(block=block)).train()
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-4)

    def step(self, batch: Any) -> None:
        self.model(pixel_values=batch.pixel_values, labels=batch.labels).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def page_out(directory: Path) -> None:
    """Ask Linux to reclaim this process's pages of the checkpoint files in `directory` (`MADV_PAGEOUT`).

    transformers memory-maps the checkpoint, and after a quantized load the mapping stays (some full-precision tensors
    still view it) with every page read while quantizing still resident, though no longer needed: RSS then counts the
    whole float32 file. Paged out, what the model still reads comes back when it is read (a float32 model's weights,
    at the first step) and counts again."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/self/maps") as maps:
        ranges = [line.split()[0] for line in maps if str(directory) in line]
    for address_range in ranges:
        start, end = (int(address, 16) for address in address_range.split("-"))
        libc.madvise(start, end - start, _MADV_PAGEOUT)


def peak_memory(path: Path, base: str, block: str, quick: bool) -> tuple[int, int, int, int]:
    """(the loaded tensors' bytes, and above what this process held before loading: the peak while loading and
    setting up the adapter, the memory held then once the checkpoint's pages are paged out (`page_out`), the peak
    over the training steps), in this process (call in a fresh one). Loading a quantized model reads the
    full-precision weights first, so its peak while loading is at least the full-precision model's."""
    memory = Memory(torch.device("cpu"))
    batches = make_batches(MEMORY_STEPS, quick, torch.device("cpu"), BATCH_SIZE)
    memory.reset()
    before = memory.baseline
    trainee = Trainee(path, base, block)
    loading = memory.peak()
    page_out(path)
    memory.reset()  # the peak starts again from here
    held = memory.baseline - before
    for batch in batches:
        trainee.step(batch)
    return tensor_bytes(trainee.model.base_model.model), loading, held, held + memory.peak()


def step_times(path: Path, block: str, quick: bool) -> dict[str, list[float]]:
    """Wall seconds of each base's steps, interleaved (the order reversed every round)."""
    keep_freed_memory(torch.device("cpu"))
    trainees = {base: Trainee(path, base, block) for base in BASES}
    batches = make_batches(ROUNDS, quick, torch.device("cpu"), BATCH_SIZE)
    wall: dict[str, list[float]] = {base: [] for base in BASES}
    for round_ in tqdm(range(WARMUP + ROUNDS), desc="  rounds", leave=False):
        for base in list(BASES) if round_ % 2 else list(BASES)[::-1]:
            if round_ < WARMUP:
                trainees[base].step(batches[0])
                continue
            with timed(torch.device("cpu"), wall[base], []):
                trainees[base].step(batches[round_ - WARMUP])
    return wall


def save_random_model(arch: str, quick: bool, path: Path) -> bool:
    """Save `efficiency.build_model(arch)` (random weights) at `path`."""
    build_model(arch, quick, torch.device("cpu")).save_pretrained(path)
    return True


def _mb(count: int) -> str:
    return f"{count / 2**20:,.1f} MB"


def _paired(values: list[float], reference: list[float]) -> float:
    return statistics.median(value / other for value, other in zip(values, reference, strict=True))


def efficiency_section(arch: str, path: Path, quick: bool) -> list[str]:
    block = (QUICK_BLOCK if quick else BLOCK)[arch]
    memory = {
        base: in_fresh_process(2, torch.device("cpu"), peak_memory, path, base, block, quick)
        for base in tqdm(BASES, desc=f"{arch}: memory, one process each")
    }
    times = in_fresh_process(2, torch.device("cpu"), step_times, path, block, quick)
    reference_peak, reference_times = memory["float32"][3], times["float32"]
    lines = [
        f"### {ARCHS[arch]}, block `{block}`",
        "",
        "| base | loaded tensors | peak while loading | held once set up | peak while training (/ float32) | step s "
        "| step / float32 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for base in BASES:
        loaded, loading, held, peak = memory[base]
        lines.append(
            f"| {base} | {_mb(loaded)} | {_mb(loading)} | {_mb(held)} | {_mb(peak)} ({peak / reference_peak:.2f}) "
            f"| {statistics.median(times[base]):.2f} | {_paired(times[base], reference_times):.2f} |"
        )
    return [*lines, ""]


def accuracy_section(quick: bool, work: Path) -> list[str]:
    splits = target_splits(quick)
    test = splits[2]
    models = {
        "demo ResNet, `stage1`": (source_model(seed=0, progress=False), ResNetForImageClassification, "stage1"),
        "digits ViT, `layer1`": (digits_vit(work / "vit-source", quick), ViTForImageClassification, "layer1"),
    }
    lines = [
        "| model, block | base | quantized | no fine-tuning | tuned | tuned, onto float32 (`verify_base=False`) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, (path, model_class, block) in models.items():
        for base in BASES:
            model = load(path, base, model_class)
            quantized = sum(p.numel() for p in model.parameters() if quantization_of(p))
            before = accuracy(model, test)
            tuned = tune(lambda path=path, base=base, cls=model_class: load(path, base, cls), block, splits, quick)
            onto_float32 = "-"
            if base != "float32":
                tuned.save_pretrained(work / "adapter")
                full = load(path, "float32", model_class)
                loaded = PeftModel.from_pretrained(full, work / "adapter", verify_base=False)
                onto_float32 = f"{100 * accuracy(loaded, test):.1f}%"
            share = quantized / sum(p.numel() for p in model.parameters())
            lines.append(
                f"| {name} | {base} | {100 * share:.1f}% of weights | {100 * before:.1f}% | "
                f"{100 * accuracy(tuned, test):.1f}% | {onto_float32} |"
            )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps: a smoke test")
    args = parser.parse_args(argv)
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    sections = ["## Peak memory and step time", ""]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for arch in ("vit_b16", "resnet50"):
            # (saved in a process of its own too: a fork after this process had run threads could hang)
            in_fresh_process(2, torch.device("cpu"), save_random_model, arch, args.quick, work / arch)
            sections += efficiency_section(arch, work / arch, args.quick)
            loads.append(os.getloadavg()[0])
        torch.set_num_threads(1)  # the demo's tiny tensors, as the demo runs them
        sections += ["## Accuracy on the demo's target", "", *accuracy_section(args.quick, work)]
        loads.append(os.getloadavg()[0])
    minutes = (time.perf_counter() - start) / 60
    header = [
        "# Surgical fine-tuning on a quantized frozen base",
        "",
        f"`python benchmarks/quantized_base.py`, {minutes:.1f} min on {os.cpu_count()} cores ({platform.machine()}, "
        f"torch {torch.__version__}, load average {min(loads):.1f} to {max(loads):.1f}); see the script's docstring "
        "for what each figure is.",
        "",
    ]
    text = "\n".join(header + sections)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "quantized_base.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
