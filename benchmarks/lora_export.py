"""A surgical adapter exported as LoRA (`surgical_peft.save_as_lora`): target accuracy and size against rank.

Two adapters, each tuned on the demo's target (digits under contrast at severity 5, 150 labelled images, the learning
rate picked on 100 more from the demo's grid, seed 0, tested on the other 649), as `surgical_peft.experiments.demo`
tunes its rows:

- the demo's `stage1` adapter: the demo's small ResNet (`source_model()`, pretrained on the clean source digits);
- a ViT `layer1` adapter: a small ViT (32x32 images, patches of 4, width 64, 4 layers) pretrained on the same clean
  source digits as the demo pretrains its ResNet (full fine-tuning from random weights, 30 epochs).

For each, the surgical adapter is the reference row; then `save_as_lora` at several ranks (ints, and floats: the
share of each delta's squared singular values kept), each loaded with `PeftModel.from_pretrained` onto the base:
target test accuracy, the bytes of `adapter_model.safetensors`, the values it stores, and the largest difference of
its logits from the surgical adapter's over the test set. Writes `benchmarks/results/lora_export.md`.

Usage:
    python benchmarks/lora_export.py           # about 5 minutes on 2 cores
    python benchmarks/lora_export.py --quick   # one learning rate, 2 epochs, fewer ranks: a smoke test
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors import safe_open
from torch import nn
from torch.utils.data import DataLoader
from transformers import ResNetForImageClassification, ViTConfig, ViTForImageClassification

import surgical_peft
from surgical_peft.experiments.data import load_digits, make_target, preprocess, split_source_target, split_target
from surgical_peft.experiments.demo import DEFAULT_SHIFT, source_model
from surgical_peft.training import FineTuneArguments, evaluate_accuracy, fine_tune

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE_SIZE = 32
LEARNING_RATES = (1e-3, 3e-3, 1e-2)  # the demo's grid
RANKS = {"demo ResNet `stage1`": [1, 2, 4, 8, 0.9, 1.0], "ViT `layer1`": [1, 2, 4, 8, 16, 32, 0.9, 1.0]}
QUICK_RANKS = [1, 1.0]


@dataclass
class Row:
    name: str
    accuracy: float
    file_bytes: int
    values: int
    logit_difference: float | None  # against the surgical adapter


def _examples(split: Any) -> list[dict[str, Any]]:
    batch = preprocess(split, image_size=IMAGE_SIZE)[:]
    return [{"pixel_values": pixels, "labels": label} for pixels, label in zip(*batch.values(), strict=True)]


def target_splits(quick: bool) -> tuple[list, list, list]:
    """The demo's labelled target train and validation sets and its test set."""
    splits = make_target(load_digits(IMAGE_SIZE), DEFAULT_SHIFT, train_n=250, severity=5, seed=0)
    labelled = split_target(splits["train"], 150, 100, seed=0)
    test = _examples(splits["eval"])
    return _examples(labelled["train"]), _examples(labelled["eval"]), test[:200] if quick else test


def digits_vit(directory: Path, quick: bool) -> Path:
    """A small ViT pretrained on the demo's clean source digits (full fine-tuning from random weights), saved in
    `directory`; returns it."""
    source = split_source_target(load_digits(IMAGE_SIZE), "none", seed=0)["source"]
    parts = split_target(source, train_n=source.num_rows * 9 // 10, seed=0)
    config = ViTConfig(
        image_size=IMAGE_SIZE, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
        intermediate_size=128, num_labels=10, id2label={index: str(index) for index in range(10)},
    )  # fmt: skip
    torch.manual_seed(0)
    args = FineTuneArguments(strategy="full", epochs=2 if quick else 30, learning_rate=1e-3, batch_size=32, seed=0)
    result = fine_tune(
        ViTForImageClassification(config), _examples(parts["train"]), None, replace(args, progress=False)
    )
    result.model.merge_and_unload().save_pretrained(directory)
    return directory


def accuracy(model: nn.Module, examples: list) -> float:
    return evaluate_accuracy(model, DataLoader(examples, batch_size=256))


@torch.no_grad()
def logits(model: nn.Module, examples: list) -> torch.Tensor:
    model.eval()
    pixels = torch.stack([example["pixel_values"] for example in examples])
    return model(pixel_values=pixels).logits


def tune(load_base: Any, block: str, splits: tuple, quick: bool) -> PeftModel:
    """The surgical adapter of `block`, the learning rate picked on the validation set as the demo picks it."""
    train, val, _ = splits
    args = FineTuneArguments(blocks=[block], epochs=2 if quick else 10, batch_size=16, seed=0, progress=False)
    tuned = {}
    for learning_rate in LEARNING_RATES[:1] if quick else LEARNING_RATES:
        model = fine_tune(load_base(), train, None, replace(args, learning_rate=learning_rate)).model
        tuned[learning_rate] = (accuracy(model, val), model)
    return max(tuned.values(), key=lambda pair: pair[0])[1]


def _stored(path: Path) -> tuple[int, int]:
    """(bytes, values) of an adapter's weights file."""
    weights = path / "adapter_model.safetensors"
    with safe_open(str(weights), framework="pt") as file:
        values = sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())  # noqa: SIM118
    return weights.stat().st_size, values


def rows_for(name: str, load_base: Any, block: str, splits: tuple, ranks: list, work: Path) -> list[Row]:
    test = splits[2]
    model = tune(load_base, block, splits, quick=ranks == QUICK_RANKS)
    reference = logits(model, test)
    surgical_peft.save_adapter(model, work / name / "surgical")
    rows = [
        Row("no fine-tuning (the base)", accuracy(load_base(), test), 0, 0, None),
        Row("surgical adapter (reference)", accuracy(model, test), *_stored(work / name / "surgical"), None),
    ]
    for rank in ranks:
        path = surgical_peft.save_as_lora(work / name / f"rank-{rank}", model, rank=rank)
        lora = PeftModel.from_pretrained(load_base(), path)
        label = (
            f"LoRA rank {rank}"
            if isinstance(rank, int)
            else f"LoRA energy {rank:g}" + (" (full rank)" if rank == 1.0 else "")
        )
        difference = (logits(lora, test) - reference).abs().max().item()
        rows.append(Row(label, accuracy(lora, test), *_stored(path), difference))
    return rows


def report(sections: dict[str, list[Row]], seconds: float, loads: list[float]) -> str:
    lines = [
        "# A surgical adapter exported as LoRA: accuracy and size against rank",
        "",
        f"`python benchmarks/lora_export.py`, {seconds / 60:.1f} min on {os.cpu_count()} cores ({platform.machine()},"
        f" torch {torch.__version__}, load average {min(loads):.1f} to {max(loads):.1f}). Digits under contrast "
        "(severity 5), 150 labelled target images, tested on 649; each LoRA adapter loaded with "
        "`PeftModel.from_pretrained` onto the base. Values: the numbers stored in `adapter_model.safetensors` "
        "(LoRA factors, `lora_B` biases and the `modules_to_save` copies: norms, BatchNorm statistics).",
        "",
    ]
    for name, rows in sections.items():
        lines += [
            f"## {name}",
            "",
            "| adapter | target accuracy | file | values | max logit difference to the surgical adapter |",
            "|---|---:|---:|---:|---:|",
        ]
        for row in rows:
            difference = "-" if row.logit_difference is None else f"{row.logit_difference:.2e}"
            size = f"{row.file_bytes / 1024:,.1f} KiB | {row.values:,}" if row.file_bytes else "- | -"
            lines.append(f"| {row.name} | {100 * row.accuracy:.1f}% | {size} | {difference} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one learning rate, 2 epochs, two ranks: a smoke test")
    args = parser.parse_args(argv)
    start, loads = time.perf_counter(), [os.getloadavg()[0]]
    torch.set_num_threads(1)  # tiny tensors: as the demo runs
    splits = target_splits(args.quick)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        resnet = source_model(seed=0, progress=False)
        vit = digits_vit(work / "vit-source", args.quick)
        bases = {
            "demo ResNet `stage1`": (lambda: ResNetForImageClassification.from_pretrained(resnet), "stage1"),
            "ViT `layer1`": (lambda: ViTForImageClassification.from_pretrained(vit), "layer1"),
        }
        sections = {}
        for name, (load_base, block) in bases.items():
            ranks = QUICK_RANKS if args.quick else RANKS[name]
            sections[name] = rows_for(name.split()[0], load_base, block, splits, ranks, work)
            loads.append(os.getloadavg()[0])
    text = report(sections, time.perf_counter() - start, loads)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "lora_export.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
