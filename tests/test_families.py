"""transformers families beyond the core vision backbones: block names, a training step and an exact round trip.

Each family is built from a tiny config (offline); a new user's path is `list_blocks`, `get_peft_model` on a block,
a step of training in `train()` mode and `save_pretrained` / `PeftModel.from_pretrained` onto a fresh base.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import transformers
from peft import PeftModel, get_peft_model
from torch import nn

from surgical_peft import SurgicalConfig, list_blocks

_TEXT = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}


class Family(NamedTuple):
    make_config: Callable[[], transformers.PretrainedConfig]
    model_class: type[nn.Module]
    blocks: list[str]
    tuned: str  # a block in the middle of the backbone
    inputs: str = "image"  # "image", "text" (sequence classification) or "causal-lm"


FAMILIES = {
    "mobilenet_v2": Family(
        lambda: transformers.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3),
        transformers.MobileNetV2ForImageClassification,
        ["conv_stem", *(f"layer{i}" for i in range(1, 17)), "conv_1x1", "head"],
        "layer8",
    ),
    "efficientnet": Family(
        lambda: transformers.EfficientNetConfig(
            image_size=32, width_coefficient=0.1, depth_coefficient=0.1, hidden_dim=128, num_labels=3
        ),
        transformers.EfficientNetForImageClassification,
        ["embeddings", *(f"layer{i}" for i in range(1, 8)), "top_conv", "top_bn", "head"],
        "layer3",
    ),
    "regnet": Family(
        lambda: transformers.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=3
        ),
        transformers.RegNetForImageClassification,
        ["embedder", "stage1", "stage2", "head"],
        "stage1",
    ),
    "convnextv2": Family(
        lambda: transformers.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3),
        transformers.ConvNextV2ForImageClassification,
        ["embeddings", "stage1", "stage2", "norm", "head"],
        "stage1",
    ),
    "swinv2": Family(
        lambda: transformers.Swinv2Config(
            image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3
        ),
        transformers.Swinv2ForImageClassification,
        ["embeddings", "stage1", "stage2", "norm", "head"],
        "stage2",
    ),
    "bert": Family(
        lambda: transformers.BertConfig(**_TEXT, intermediate_size=32, num_labels=3),
        transformers.BertForSequenceClassification,
        ["embeddings", "layer1", "layer2", "pooler", "head"],
        "layer1",
        inputs="text",
    ),
    "gpt2": Family(  # lm_head is tied to wte: the embedding block holds both, there is no separate head
        lambda: transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, bos_token_id=0, eos_token_id=0
        ),
        transformers.GPT2LMHeadModel,
        ["wte", "wpe", "layer1", "layer2", "norm"],
        "layer2",
        inputs="causal-lm",
    ),
    "llama": Family(
        lambda: transformers.LlamaConfig(**_TEXT, num_key_value_heads=1, intermediate_size=32),
        transformers.LlamaForCausalLM,
        ["embed_tokens", "layer1", "layer2", "norm", "head"],
        "layer1",
        inputs="causal-lm",
    ),
}


def build(name: str, seed: int = 0) -> nn.Module:
    family = FAMILIES[name]
    torch.manual_seed(seed)
    return family.model_class(family.make_config()).eval()


def batch(name: str) -> dict[str, torch.Tensor]:
    """Four labelled examples: images, or token ids (a causal LM's labels are its inputs)."""
    generator = torch.Generator().manual_seed(1234)
    labels = torch.tensor([0, 1, 2, 0])
    if FAMILIES[name].inputs == "image":
        return {"pixel_values": torch.randn(4, 3, 32, 32, generator=generator), "labels": labels}
    input_ids = torch.randint(0, 50, (4, 8), generator=generator)
    return {"input_ids": input_ids, "labels": input_ids if FAMILIES[name].inputs == "causal-lm" else labels}


@torch.no_grad()
def logits_of(model: nn.Module, name: str) -> torch.Tensor:
    model.eval()
    inputs = {key: value for key, value in batch(name).items() if key != "labels"}
    return model(**inputs).logits


@pytest.fixture(params=list(FAMILIES))
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_block_names_cover_every_parameter(family: str) -> None:
    model = build(family)
    blocks = list_blocks(model)
    assert blocks.structural
    assert list(blocks) == FAMILIES[family].blocks
    owners = {name: blocks.block_of(name) for name, _ in model.named_parameters()}
    assert None not in owners.values(), owners
    assert sum(blocks.num_parameters.values()) == model.num_parameters()


def test_training_step_and_round_trip(family: str, tmp_path: Path) -> None:
    model = build(family)
    tuned = FAMILIES[family].tuned
    paths = list_blocks(model)[tuned]
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    peft_model = get_peft_model(model, SurgicalConfig(block=tuned))
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.5)
    peft_model.train()
    peft_model(**batch(family)).loss.backward()
    optimizer.step()
    changed = {name for name, tensor in model.state_dict().items() if not torch.equal(tensor, before[name])}
    assert changed and all(any(name.startswith(path + ".") for path in paths) for name in changed), changed

    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(family), tmp_path)
    torch.testing.assert_close(logits_of(loaded, family), logits_of(peft_model, family), rtol=0, atol=1e-5)


def test_tied_lm_head_trains_with_its_embedding(tmp_path: Path) -> None:
    # GPT-2's lm_head is its wte: `wte` tunes both, and "head" is no block (it used to train nothing).
    model = build("gpt2")
    before = model.lm_head.weight.clone()
    peft_model = get_peft_model(model, SurgicalConfig(block="wte"))
    peft_model.train()
    peft_model(**batch("gpt2")).loss.backward()
    torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5).step()
    assert not torch.equal(model.lm_head.weight, before)
    peft_model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("gpt2"), tmp_path)
    torch.testing.assert_close(logits_of(loaded, "gpt2"), logits_of(peft_model, "gpt2"), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown block 'head'"):
        get_peft_model(build("gpt2"), SurgicalConfig(block="head"))
