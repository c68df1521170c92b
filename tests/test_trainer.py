"""`transformers.Trainer` on a surgical model, as a PEFT user runs it: it trains every block choice, `save_model`
writes an adapter that `PeftModel.from_pretrained` reloads onto a fresh base with the same outputs, and a run resumed
from a checkpoint (`resume_from_checkpoint`) ends bit-identical to the uninterrupted run.

`block="all"` once resumed 1.1e-3 apart: the checkpoint holds deltas, and `base + (tuned - base)` is `tuned` only up
to float rounding, which the rest of the run amplified. Saving now rounds the model to exactly what the file holds.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from conftest import build_model
from peft import PeftModel, get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig

BLOCKS = ["embedder", "stage1", "stage2", "head", "all"]  # every block of the tiny ResNet, and all of them
STEPS, SAVE_EVERY = 8, 4


class Images(torch.utils.data.Dataset):
    """32 random 16x16 RGB images with labels in 0..2, as dicts of the model's inputs (what a user's dataset gives)."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.images = torch.randn(32, 3, 16, 16, generator=generator)
        self.labels = torch.randint(0, 3, (32,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def trainer(block: str, output_dir: Path) -> transformers.Trainer:
    """A Trainer for a fresh surgical model of `block`, saving a checkpoint every `SAVE_EVERY` steps."""
    arguments = transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
        remove_unused_columns=False,  # as in PEFT's image-classification guide (on-the-fly transforms)
        use_cpu=True,
        report_to=[],
        logging_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    model = get_peft_model(build_model("resnet-basic"), SurgicalConfig(block=block))
    return transformers.Trainer(model=model, args=arguments, train_dataset=Images())


def tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(params=BLOCKS)
def block(request: pytest.FixtureRequest) -> str:
    return request.param


def test_trainer_trains_saves_reloads_and_resumes_exactly(
    block: str, logits_of: Callable[[nn.Module], torch.Tensor], tmp_path: Path
) -> None:
    uninterrupted = trainer(block, tmp_path / "run")
    base_logits = logits_of(uninterrupted.model)
    uninterrupted.train()
    final = tensors(uninterrupted.model)
    trained_logits = logits_of(uninterrupted.model)
    assert not torch.equal(trained_logits, base_logits)

    uninterrupted.save_model(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(build_model("resnet-basic"), tmp_path / "adapter")
    assert torch.equal(logits_of(reloaded), trained_logits)

    resumed = trainer(block, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / f"checkpoint-{SAVE_EVERY}"))
    assert resumed.state.global_step == STEPS
    after = tensors(resumed.model)
    assert after.keys() == final.keys()
    differing = {
        name: (after[name].double() - final[name].double()).abs().max().item()
        for name in final
        if not torch.equal(after[name], final[name])
    }
    assert not differing, f"the resumed run ends apart from the uninterrupted one: {differing}"
