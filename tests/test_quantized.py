"""A quantized frozen base (`pip install "surgical-peft[quantization]"`): bitsandbytes 8-bit through transformers'
`BitsAndBytesConfig`, torchao's int8 weight-only through `TorchAoConfig` (bitsandbytes 4-bit repacks its storage on a
CPU's first eval forward pass, so a base fingerprint taken before it and after it differs: see
docs/guides/lora-export-and-quantization.md). The tuned block trains in full precision, every other block stays
quantized; the adapter holds the tuned block only and records the base it was tuned on; it loads onto that base
quantized the same way, and onto its full-precision checkpoint only when asked.

Each backend's tests are skipped where its package is absent (importing either makes PEFT import it too, which prints
on every `import peft`, so CI installs them beside the main environment: `.ci/run`)."""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from safetensors.torch import load_file, save_file
from torch import nn

from surgical_peft import SurgicalConfig
from surgical_peft.errors import InputError
from surgical_peft.tuner.fingerprint import hash_tensor
from surgical_peft.tuner.quantized import quantization_of

BACKENDS = {  # name -> (package, quantization_config factory, the quantized storage it holds)
    "bitsandbytes-8bit": (
        "bitsandbytes",
        lambda: transformers.BitsAndBytesConfig(load_in_8bit=True),
        "bitsandbytes Int8Params",
    ),
    "torchao-int8": (
        "torchao",
        lambda: transformers.TorchAoConfig(_torchao_int8()),
        "torchao Int8Tensor",
    ),
}
BLOCK, FROZEN = "layer2", "vit.layers.0"
TUNED = "vit.layers.1"


def _torchao_int8() -> object:
    from torchao.quantization import Int8WeightOnlyConfig

    return Int8WeightOnlyConfig()


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> str:
    if importlib.util.find_spec(BACKENDS[request.param][0]) is None:
        pytest.skip(f"{BACKENDS[request.param][0]} is not installed (pip install 'surgical-peft[quantization]')")
    return request.param


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small ViT saved with save_pretrained (linear layers of 64 features: bitsandbytes' CPU blocks divide them)."""
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    config.num_labels = 3
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vit")
    transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


@pytest.fixture
def load(checkpoint: Path) -> Callable[..., nn.Module]:
    """`load(backend)`: the checkpoint quantized by `backend`; `load(None)`: in full precision."""

    def load(backend: str | None) -> nn.Module:
        quantized = {} if backend is None else {"quantization_config": BACKENDS[backend][1](), "device_map": "cpu"}
        return transformers.ViTForImageClassification.from_pretrained(checkpoint, **quantized).eval()

    return load


def storage(module: nn.Module) -> str:
    """A digest of everything `module` stores (quantized data and scales included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        hash_tensor(digest, name, tensor)
    return digest.hexdigest()


def linears(model: nn.Module, under: str) -> dict[str, nn.Module]:
    return {path: module for path, module in model.named_modules() if path.startswith(under + ".") and "proj" in path}


def tuned(model: nn.Module, train: Callable[..., None], **config: object) -> PeftModel:
    peft_model = get_peft_model(model, SurgicalConfig(block=BLOCK, **config))
    train(peft_model, lr=0.05)
    return peft_model


def test_the_tuned_block_trains_in_full_precision_the_rest_stays_quantized(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], logits_of: Callable[..., torch.Tensor]
) -> None:
    model = load(backend)
    frozen_before = storage(model.vit.layers[0])
    before = logits_of(model)
    peft_model = tuned(model, train)
    for module in linears(model, TUNED).values():
        assert type(module) is nn.Linear and module.weight.dtype == torch.float32 and module.weight.requires_grad
    for module in linears(model, FROZEN).values():
        assert quantization_of(module.weight) == BACKENDS[backend][2] and not module.weight.requires_grad
    assert storage(model.vit.layers[0]) == frozen_before
    assert not torch.allclose(logits_of(peft_model), before, atol=1e-3)  # it trained


def test_the_adapter_holds_the_tuned_block_and_names_its_base(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], checkpoint: Path, tmp_path: Path
) -> None:
    tuned(load(backend), train).save_pretrained(tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    assert keys and all(key.startswith(f"base_model.model.{TUNED}.") for key in keys)
    assert all(tensor.dtype == torch.float32 for tensor in keys.values())
    config = SurgicalConfig.from_pretrained(tmp_path)
    assert config.base_model_name_or_path == str(checkpoint)
    assert config.base_fingerprint["quantized"] == [BACKENDS[backend][2]]


def test_it_loads_onto_the_same_quantized_base(
    backend: str,
    load: Callable[..., nn.Module],
    train: Callable[..., None],
    logits_of: Callable[..., torch.Tensor],
    tmp_path: Path,
) -> None:
    model = tuned(load(backend), train)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(load(backend), tmp_path)
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=1e-5)


def test_the_full_precision_base_is_refused_unless_asked(
    backend: str,
    load: Callable[..., nn.Module],
    train: Callable[..., None],
    logits_of: Callable[..., torch.Tensor],
    tmp_path: Path,
) -> None:
    model = tuned(load(backend), train)
    model.save_pretrained(tmp_path)
    base = load(None)
    with pytest.raises(InputError, match=f"tuned on a quantized base \\({BACKENDS[backend][2]};.*not quantized"):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(type(module) is nn.Linear for module in linears(base, TUNED).values())  # untouched
    loaded = PeftModel.from_pretrained(base, tmp_path, verify_base=False)
    # the deltas apply to the full-precision weights: off by the quantization error, no more
    difference = (logits_of(loaded) - logits_of(model)).abs().max().item()
    assert 0 < difference < 0.1 * logits_of(model).abs().max().item()


def test_a_full_precision_adapter_is_refused_on_a_quantized_base(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    tuned(load(None), train).save_pretrained(tmp_path)
    base = load(backend)
    with pytest.raises(
        InputError, match=f"tuned on a full-precision base, but this model is quantized with {BACKENDS[backend][2]}"
    ):
        PeftModel.from_pretrained(base, tmp_path)
    assert all(quantization_of(module.weight) for module in linears(base, TUNED).values())


def test_unload_puts_the_quantized_modules_back_and_merge_keeps_the_tuned_weights(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], logits_of: Callable[..., torch.Tensor]
) -> None:
    model = load(backend)
    originals, stored = linears(model, TUNED), storage(model)
    base_logits = logits_of(model)
    unloaded = tuned(model, train).unload()
    assert linears(unloaded, TUNED) == originals and storage(unloaded) == stored  # the very modules, untouched
    torch.testing.assert_close(logits_of(unloaded), base_logits, rtol=0, atol=0)
    peft_model = tuned(load(backend), train)
    expected = logits_of(peft_model)
    merged = peft_model.merge_and_unload()
    assert all(type(module) is nn.Linear for module in linears(merged, TUNED).values())
    torch.testing.assert_close(logits_of(merged), expected, rtol=0, atol=0)


def test_a_failed_load_puts_the_quantized_modules_back(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], tmp_path: Path
) -> None:
    tuned(load(backend), train).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].flatten()[:3].clone()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    base = load(backend)
    originals = linears(base, TUNED)
    with pytest.raises(InputError, match="has shape \\(3,\\)"):
        PeftModel.from_pretrained(base, tmp_path)
    assert linears(base, TUNED) == originals


def test_peft_s_prepare_model_for_kbit_training_composes(
    backend: str, load: Callable[..., nn.Module], train: Callable[..., None], logits_of: Callable[..., torch.Tensor]
) -> None:
    model = prepare_model_for_kbit_training(load(backend))  # (it freezes everything, enables checkpointing)
    assert model.is_activation_checkpointing
    peft_model = tuned(model, train)
    trainable = {name.partition(".tuned.")[0] for name, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("vit/layers/1/" in name for name in trainable)
    for module in linears(model, FROZEN).values():
        assert quantization_of(module.weight) is not None
