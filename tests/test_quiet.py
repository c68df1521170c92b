"""Output a user sees: no warning the library's own calls trigger."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from surgical_peft.training import FineTuneArguments, fine_tune


def test_fine_tune_does_not_warn_about_gradient_checkpointing(make_model: Callable[..., nn.Module]) -> None:
    # PEFT 0.21 reads transformers' deprecated `is_gradient_checkpointing` in every get_peft_model call.
    data = [{"pixel_values": torch.randn(3, 32, 32), "labels": i % 3} for i in range(4)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fine_tune(
            make_model("resnet-basic"), data, None, FineTuneArguments(blocks=["stage1"], epochs=1, progress=False)
        )
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]
