"""Shared fixtures: tiny randomly initialised vision models for every supported architecture, no network."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

import surgical_peft  # noqa: F401  (registers the SURGICAL peft type)

ACCELERATE_LAUNCH = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch"]
"""`accelerate launch` of the tests' own interpreter (an `accelerate` first on PATH may belong to another Python)."""

# The models are tiny: a second thread buys nothing and, on a busy machine, costs up to 100x in OpenMP contention.
torch.set_num_threads(1)

_TRANSFORMER = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "num_labels": 3,
}

# name -> (config factory, model class); each config is the smallest that keeps the architecture's structure.
ARCHITECTURES: dict[str, tuple[Callable[[], transformers.PretrainedConfig], type[nn.Module]]] = {
    "resnet-basic": (
        lambda: transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic", num_labels=3
        ),
        transformers.ResNetForImageClassification,
    ),
    "resnet-bottleneck": (
        lambda: transformers.ResNetConfig(
            embedding_size=8, hidden_sizes=[16, 32], depths=[1, 1], layer_type="bottleneck", num_labels=3
        ),
        transformers.ResNetForImageClassification,
    ),
    "vit": (lambda: transformers.ViTConfig(**_TRANSFORMER), transformers.ViTForImageClassification),
    "deit": (lambda: transformers.DeiTConfig(**_TRANSFORMER), transformers.DeiTForImageClassification),
    "beit": (lambda: transformers.BeitConfig(**_TRANSFORMER), transformers.BeitForImageClassification),
    "dinov2": (lambda: transformers.Dinov2Config(**_TRANSFORMER), transformers.Dinov2ForImageClassification),
    "convnext": (
        lambda: transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        transformers.ConvNextForImageClassification,
    ),
    "swin": (
        lambda: transformers.SwinConfig(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3
        ),
        transformers.SwinForImageClassification,
    ),
}


def build_model(arch: str, seed: int = 0, **overrides: object) -> nn.Module:
    """A tiny `arch` model with weights drawn from `seed` (the same seed gives the same weights)."""
    make_config, model_class = ARCHITECTURES[arch]
    config = make_config()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    return model_class(config).eval()


def save_tiny_model(path: Path, num_labels: int) -> str:
    """A tiny ResNet for `num_labels` classes of 32x32 images, saved with save_pretrained into `path`."""
    model = build_model("resnet-basic", num_labels=num_labels)
    model.config.image_size = 32
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny ResNet for the 10 digit classes, saved with save_pretrained (read-only for the tests)."""
    return save_tiny_model(tmp_path_factory.mktemp("digits-model"), num_labels=10)


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request: pytest.FixtureRequest) -> str:
    """Every supported architecture in turn."""
    return request.param


@pytest.fixture
def middle_block(arch: str) -> str:
    """A block in the middle of `arch`'s backbone."""
    return "stage1" if arch.startswith(("resnet", "convnext", "swin")) else "layer1"


@pytest.fixture
def make_model() -> Callable[..., nn.Module]:
    """`make_model(arch, seed=0, **config_overrides)`: a tiny model in eval mode."""
    return build_model


@pytest.fixture
def pixel_values() -> torch.Tensor:
    """A fixed batch of four 32x32 RGB images."""
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1234))


@pytest.fixture
def labels() -> torch.Tensor:
    return torch.tensor([0, 1, 2, 0])


@pytest.fixture
def logits_of(pixel_values: torch.Tensor) -> Callable[[nn.Module], torch.Tensor]:
    """`logits_of(model)`: eval-mode logits on `pixel_values` (the model is left in eval mode)."""

    @torch.no_grad()
    def logits_of(model: nn.Module) -> torch.Tensor:
        model.eval()
        return model(pixel_values=pixel_values).logits

    return logits_of


@pytest.fixture
def train(pixel_values: torch.Tensor, labels: torch.Tensor) -> Callable[..., None]:
    """`train(model, steps=3, lr=0.5)`: a few SGD steps on the trainable parameters, in train() mode."""

    def train(model: nn.Module, steps: int = 3, lr: float = 0.5) -> None:
        parameters = [p for p in model.parameters() if p.requires_grad]
        assert parameters, "nothing to train"
        optimizer = torch.optim.SGD(parameters, lr=lr)
        model.train()
        for _ in range(steps):
            model(pixel_values=pixel_values, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.eval()

    return train


class ModelState(NamedTuple):
    """What a user can observe of a model: its tensors, trainability flags and forward hooks."""

    tensors: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]
    hooks: dict[str, tuple[int, int]]


def model_state(model: nn.Module) -> ModelState:
    return ModelState(
        tensors={name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        requires_grad={name: parameter.requires_grad for name, parameter in model.named_parameters()},
        hooks={name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()},
    )


@pytest.fixture
def take_snapshot() -> Callable[[nn.Module], ModelState]:
    """`take_snapshot(model)`: a copy of the model's tensors, requires_grad flags and hook counts."""
    return model_state


@pytest.fixture
def assert_untouched() -> Callable[[nn.Module, ModelState], None]:
    """`assert_untouched(model, before)`: tensors bitwise equal, same requires_grad flags and hooks, no PEFT left."""

    def assert_untouched(model: nn.Module, before: ModelState) -> None:
        after = model_state(model)
        assert list(after.tensors) == list(before.tensors)
        changed = [name for name, tensor in before.tensors.items() if not torch.equal(after.tensors[name], tensor)]
        assert not changed, f"changed: {changed}"
        assert after.requires_grad == before.requires_grad
        assert after.hooks == before.hooks
        assert not hasattr(model, "peft_config")
        assert not any(isinstance(module, BaseTunerLayer) for module in model.modules())

    return assert_untouched
