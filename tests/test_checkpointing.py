"""Gradient checkpointing composes with surgical adapters, enabled the way PEFT's guides do it (on the base model,
before `get_peft_model`): the same gradients as without it, and the frozen layers before the tuned block build no
graph and are never recomputed, while the layers after it still are.

Transformers' ResNet and ConvNeXt do not support checkpointing (`gradient_checkpointing_enable` raises); Swin, whose
stages and blocks both checkpoint (nested), stands in for a hierarchical model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from conftest import build_model
from peft import get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig

# (architecture, block, a module inside a checkpointed layer before the block, one inside a layer after it)
CASES = {
    ("vit", "layer1"): (None, "vit.layers.1.attention"),
    ("vit", "layer2"): ("vit.layers.0.attention", None),
    ("vit", "head"): ("vit.layers.1.attention", None),
    ("swin", "stage1"): (None, "swin.encoder.layers.1.blocks.0.attention"),
    ("swin", "head"): ("swin.encoder.layers.1.blocks.0.attention", None),
}


def surgical(arch: str, block: str, checkpointing: dict[str, Any] | None) -> nn.Module:
    """A surgical model of `block`, with checkpointing enabled first (`checkpointing`: its kwargs) or not (`None`)."""
    model = build_model(arch)
    if checkpointing is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    return get_peft_model(model, SurgicalConfig(block=block)).train()


def gradients(model: nn.Module, pixel_values: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor | None]:
    """The gradient of every parameter after one forward and backward pass (the same dropout draws every time)."""
    torch.manual_seed(0)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


@contextmanager
def calls_of(model: nn.Module, path: str | None) -> Iterator[list[torch.Tensor]]:
    """The outputs of every call of the module at `path` (recomputations included), while in the block."""
    outputs: list[torch.Tensor] = []
    if path is None:
        yield outputs
        return
    handle = model.base_model.model.get_submodule(path).register_forward_hook(
        lambda module, args, output: outputs.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        yield outputs
    finally:
        handle.remove()


@pytest.mark.parametrize(("arch", "block"), list(CASES))
def test_checkpointing_gives_the_same_gradients(
    arch: str, block: str, pixel_values: torch.Tensor, labels: torch.Tensor
) -> None:
    expected = gradients(surgical(arch, block, None), pixel_values, labels)
    trainable = {name for name, grad in expected.items() if grad is not None}
    assert trainable and all(".classifier." in name or block != "head" for name in trainable)
    for kwargs in ({"use_reentrant": False}, None):  # explicit, and transformers' default
        found = gradients(surgical(arch, block, kwargs), pixel_values, labels)
        assert {name for name, grad in found.items() if grad is not None} == trainable
        for name in trainable:
            torch.testing.assert_close(found[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize(("arch", "block"), list(CASES))
def test_frozen_prefix_builds_no_graph_and_is_not_recomputed(
    arch: str, block: str, pixel_values: torch.Tensor, labels: torch.Tensor
) -> None:
    before, after = CASES[arch, block]
    model = surgical(arch, block, {"use_reentrant": False})
    with calls_of(model, before) as prefix, calls_of(model, after) as suffix:
        gradients(model, pixel_values, labels)
    if before is not None:
        assert len(prefix) == 1  # run once, never recomputed
        assert prefix[0].grad_fn is None and not prefix[0].requires_grad
    if after is not None:  # after the tuned block, checkpointing still saves memory: the layer is recomputed
        assert len(suffix) == 2
        assert suffix[0].requires_grad


def test_reentrant_checkpointing_keeps_correct_gradients_and_says_how_to_spare_the_prefix(
    pixel_values: torch.Tensor, labels: torch.Tensor
) -> None:
    expected = gradients(surgical("vit", "layer2", None), pixel_values, labels)
    model = surgical("vit", "layer2", {"use_reentrant": True})
    with pytest.warns(UserWarning, match=r'gradient_checkpointing_kwargs=\{"use_reentrant": False\}'):
        found = gradients(model, pixel_values, labels)
    for name, grad in expected.items():
        if grad is None:
            assert found[name] is None, name
        else:
            torch.testing.assert_close(found[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_input_gradients_asked_for_without_checkpointing_are_left_alone(
    make_model: Callable[..., nn.Module], pixel_values: torch.Tensor
) -> None:
    model = make_model("vit")
    peft_model = get_peft_model(model, SurgicalConfig(block="layer2")).train()
    model.enable_input_require_grads()  # e.g. for saliency maps
    with calls_of(peft_model, "vit.embeddings") as embedded:
        peft_model(pixel_values=pixel_values)
    assert embedded[0].requires_grad
