"""Serving: PEFT's mixed-adapter batches (`adapter_names`), `fan_out`, compiling across `set_adapter`.

Each row of a mixed batch, and each output of `fan_out`, is compared with that adapter run alone; the model is
compared, tensor by tensor, hook by hook, with itself before the call (also after a refused or failing call).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from peft import get_peft_model
from torch import nn
from torch._dynamo.testing import CompileCounter

from surgical_peft import SurgicalConfig, fan_out
from surgical_peft.errors import InputError
from surgical_peft.serving import keep_on_device

TOLERANCE = 1e-5
_TEXT = {"vocab_size": 50, "hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 32}


def _peft_model(base: nn.Module, blocks: dict[str, str], **config: Any) -> nn.Module:
    """`base` with one adapter per entry of `blocks` (name -> block), each with random deltas; the first active."""
    torch.manual_seed(1)
    (first, block), *others = blocks.items()
    model = get_peft_model(base, SurgicalConfig(block=block, init_weights=False, **config), adapter_name=first)
    for name, other in others:
        model.add_adapter(name, SurgicalConfig(block=other, init_weights=False, **config))
    return model.eval()


def _resnet() -> nn.Module:
    """A tiny ResNet whose adapters on `stage1` have BatchNorm statistics of their own (one per input scale)."""
    torch.manual_seed(0)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    model = _peft_model(
        transformers.ResNetForImageClassification(config).eval(), {"one": "stage1", "two": "stage1", "deep": "stage2"}
    )
    for scale, name in enumerate(["one", "two", "deep"], start=1):
        model.set_adapter(name)
        model.train()
        with torch.no_grad():
            model(pixel_values=scale * torch.randn(8, 3, 32, 32))
    model.set_adapter("one")
    return model.eval()


@torch.no_grad()
def _alone(model: nn.Module, name: str, call: str = "__call__", **inputs: Any) -> Any:
    """`inputs` through adapter `name` alone (`"__base__"`: the base); the active adapter is restored."""
    if name == "__base__":
        with model.disable_adapter():
            return getattr(model, call)(**inputs)
    active = model.active_adapter
    model.set_adapter(name)
    try:
        return getattr(model, call)(**inputs)
    finally:
        model.set_adapter(active)


def _state(model: nn.Module) -> dict[str, Any]:
    """What a call must leave as it was: tensors, flags, hooks, instance forwards, the active adapter."""
    return {
        "tensors": {name: tensor.detach().clone() for name, tensor in model.state_dict().items()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()},
        "forwards": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "active": model.active_adapter,
        "training": model.training,
    }


def _assert_same_state(model: nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    changed = [name for name, tensor in before["tensors"].items() if not torch.equal(after["tensors"][name], tensor)]
    assert not changed
    assert {key: value for key, value in after.items() if key != "tensors"} == {
        key: value for key, value in before.items() if key != "tensors"
    }


def _max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first - second).abs().max().item()


def _rows_seen(module: nn.Module) -> tuple[list[int], Any]:
    """The number of rows of each call of `module` (a list that fills), and the hook's handle."""
    seen: list[int] = []
    handle = module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[0]))
    return seen, handle


# --------------------------------------------------------------------------------------------- mixed batches
def test_resnet_rows_equal_each_adapter_alone_with_its_batchnorm_statistics() -> None:
    model = _resnet()
    one = model.base_model.surgical_layers["resnet/encoder/stages/0/layers/0/layer/0/normalization"]
    assert not torch.equal(one.weights("one")["running_mean"], one.weights("two")["running_mean"])
    names = ["one", "two", "deep", "__base__", "two", "one"]
    pixel_values = torch.randn(6, 3, 32, 32)
    before = _state(model)
    embedder, head = model.base_model.model.resnet.embedder, model.base_model.model.classifier
    (embedder_rows, embedder_hook), (head_rows, head_hook) = _rows_seen(embedder), _rows_seen(head)
    with torch.no_grad():
        mixed = model(pixel_values=pixel_values, adapter_names=names).logits
    embedder_hook.remove(), head_hook.remove()
    _assert_same_state(model, before)
    assert embedder_rows == [6] and head_rows == [6]  # outside every adapter's blocks: once, the whole batch
    for row, name in enumerate(names):
        assert _max_difference(mixed[row], _alone(model, name, pixel_values=pixel_values).logits[row]) <= TOLERANCE


def test_vit_rows_equal_each_adapter_alone() -> None:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    blocks = {"first": "layer1", "second": "layer2", "stem": "embeddings", "head": "head"}
    model = _peft_model(transformers.ViTForImageClassification(config).eval(), blocks)
    names = ["second", "stem", "__base__", "first", "head"]
    pixel_values = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        mixed = model(pixel_values=pixel_values, adapter_names=names).logits
    for row, name in enumerate(names):
        assert _max_difference(mixed[row], _alone(model, name, pixel_values=pixel_values).logits[row]) <= TOLERANCE


def _bert(**adapter_config: Any) -> nn.Module:
    torch.manual_seed(0)
    base = transformers.BertForSequenceClassification(
        transformers.BertConfig(**_TEXT, num_hidden_layers=3, num_labels=3)
    )
    return _peft_model(base.eval(), {"one": "layer2", "two": "layer2", "three": "layer3"}, **adapter_config)


def _text_batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, 50, (4, 7), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones(4, 7, dtype=torch.long)
    attention_mask[1, 4:] = attention_mask[3, 2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@pytest.mark.parametrize("task_type", [None, "SEQ_CLS"])  # SEQ_CLS: PEFT wraps the classifier in modules_to_save
def test_text_classifier_rows_equal_each_adapter_alone(task_type: str | None) -> None:
    model = _bert(task_type=task_type)
    names = ["three", "one", "__base__", "two"]
    inputs = _text_batch()
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for row, name in enumerate(names):
        assert _max_difference(mixed[row], _alone(model, name, **inputs).logits[row]) <= TOLERANCE


@pytest.mark.parametrize("generation", [{}, {"num_beams": 3}], ids=["greedy", "beams"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_causal_lm_generates_each_row_as_its_adapter_alone(family: str, generation: dict[str, int]) -> None:
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32, eos_token_id=None
        )
        base = transformers.GPT2LMHeadModel(config)
    else:
        config = transformers.LlamaConfig(**_TEXT, num_hidden_layers=2, num_key_value_heads=1, eos_token_id=None)
        base = transformers.LlamaForCausalLM(config)
    model = _peft_model(base.eval(), {"one": "layer1", "two": "layer2", "three": "layer1"}, task_type="CAUSAL_LM")
    for layer in model.base_model.surgical_layers.values():  # deltas large enough to change the tokens
        for name in layer.adapters:
            layer.set_delta(name, {key: 0.5 * torch.randn_like(base) for key, base in layer.base.items()})
    input_ids = torch.randint(1, 50, (4, 5), generator=torch.Generator().manual_seed(0))
    names = ["two", "one", "__base__", "three"]
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0, **generation}
    with torch.no_grad():
        mixed = model.generate(input_ids=input_ids, adapter_names=names, **settings)
    for row, name in enumerate(names):
        alone = _alone(model, name, "generate", input_ids=input_ids, **settings)
        assert mixed[row].tolist() == alone[row].tolist()
    assert len({tuple(row.tolist()) for row in mixed}) == 4  # the adapters do generate different tokens


def test_tied_weights_follow_their_adapter() -> None:
    """GPT-2's `wte` block holds `lm_head`, tied to the embedding: the head of each row uses its adapter's weights."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = _peft_model(transformers.GPT2LMHeadModel(config).eval(), {"embed": "wte", "layer": "layer2"})
    input_ids = torch.randint(0, 50, (3, 6))
    names = ["layer", "embed", "__base__"]
    with torch.no_grad():
        mixed = model(input_ids=input_ids, adapter_names=names, use_cache=False).logits
    for row, name in enumerate(names):
        alone = _alone(model, name, input_ids=input_ids, use_cache=False).logits
        assert _max_difference(mixed[row], alone[row]) <= TOLERANCE


def test_several_active_adapters_on_one_block() -> None:
    """With two adapters active together on one block, the module holds the sum of their deltas; a mixed batch
    still gives each named adapter its own weights there."""
    model = _resnet()
    model.base_model.set_adapter(["one", "two"])
    pixel_values = torch.randn(3, 3, 32, 32)
    names = ["two", "one", "__base__"]
    with torch.no_grad():
        mixed = model(pixel_values=pixel_values, adapter_names=names).logits
    assert model.active_adapters == ["one", "two"]
    for row, name in enumerate(names):
        assert _max_difference(mixed[row], _alone(model, name, pixel_values=pixel_values).logits[row]) <= TOLERANCE


def test_keep_on_device_gives_the_same_rows() -> None:
    model = _resnet()
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(pixel_values=pixel_values, adapter_names=["two", "deep"]).logits
        with keep_on_device(model, ["two", "deep"]):
            kept = model(pixel_values=pixel_values, adapter_names=["two", "deep"]).logits
    assert torch.equal(kept, expected)


# ---------------------------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    ("adapter_names", "message"),
    [
        (["one", "missing", "one"], "unknown adapter(s) ['missing']. Valid: ['one', 'two', 'deep', '__base__']"),
        (["one", "two"], "got 3 rows for 2 adapter names"),
        ("one", "takes a list of adapter names, got 'one'"),
    ],
    ids=["unknown", "length", "string"],
)
def test_bad_names_are_refused_and_change_nothing(adapter_names: Any, message: str) -> None:
    model = _resnet()
    before = _state(model)
    with pytest.raises(InputError, match=re.escape(message)):
        model(pixel_values=torch.randn(3, 3, 32, 32), adapter_names=adapter_names)
    _assert_same_state(model, before)


def test_training_mode_is_refused() -> None:
    model = _resnet().train()
    before = _state(model)
    with pytest.raises(InputError, match=r"for inference: call model.eval\(\) first"):
        model(pixel_values=torch.randn(2, 3, 32, 32), adapter_names=["one", "two"])
    _assert_same_state(model, before)


def test_a_call_failing_inside_a_block_leaves_the_model_as_it_was() -> None:
    model = _resnet()
    stage1 = model.base_model.model.resnet.encoder.stages[0]

    def fail(module: nn.Module, args: tuple) -> None:
        raise RuntimeError("failing inside the block, with a group's weights in place")

    handle = stage1.layers[0].layer[1].register_forward_pre_hook(fail)
    before = _state(model)
    with pytest.raises(RuntimeError, match="failing inside the block"):
        model(pixel_values=torch.randn(2, 3, 32, 32), adapter_names=["two", "one"])
    _assert_same_state(model, before)
    handle.remove()


# ------------------------------------------------------------------------------------------------------ fan_out
def test_fan_out_runs_the_frozen_prefix_once() -> None:
    model = _resnet()
    model.add_adapter("head", SurgicalConfig(block="head", init_weights=False))
    names = ["deep", "head", "__base__", "one"]
    pixel_values = torch.randn(3, 3, 32, 32)
    before = _state(model)
    embedder, stage2 = model.base_model.model.resnet.embedder, model.base_model.model.resnet.encoder.stages[1]
    (embedder_rows, embedder_hook), (stage2_rows, stage2_hook) = _rows_seen(embedder), _rows_seen(stage2)
    outputs = fan_out(model, adapter_names=names, pixel_values=pixel_values)
    embedder_hook.remove(), stage2_hook.remove()
    _assert_same_state(model, before)
    assert embedder_rows == [3]  # the prefix before the earliest tuned block (stage1), once
    assert stage2_rows == [6]  # "one" and the others, whose stage1 is the base's: two copies of the batch
    for name in names:
        alone = _alone(model, name, pixel_values=pixel_values).logits
        assert _max_difference(outputs[name].logits, alone) <= TOLERANCE


@pytest.mark.parametrize("with_mask", [False, True], ids=["input_ids", "with-attention-mask"])
def test_fan_out_text(with_mask: bool) -> None:
    """`input_ids` alone share the prefix; with an attention mask, which every layer takes with the batch's rows,
    the input is stacked per adapter instead (nothing shared, still exact)."""
    model = _bert()
    inputs = _text_batch() if with_mask else {"input_ids": _text_batch()["input_ids"]}
    first_layer = model.base_model.model.bert.encoder.layer[0]
    seen, hook = _rows_seen(first_layer)
    outputs = fan_out(model, adapter_names=["one", "three", "__base__"], **inputs)
    hook.remove()
    assert seen == ([12] if with_mask else [4])
    for name, output in outputs.items():
        assert _max_difference(output.logits, _alone(model, name, **inputs).logits) <= TOLERANCE


def test_fan_out_refuses_what_it_cannot_split() -> None:
    model = _resnet()
    pixel_values = torch.randn(2, 3, 32, 32)
    with pytest.raises(InputError, match=r"distinct adapter names"):
        fan_out(model, adapter_names=["one", "one"], pixel_values=pixel_values)
    with pytest.raises(InputError, match=r"not one row per example \(leave out labels"):
        fan_out(model, adapter_names=["one", "two"], pixel_values=pixel_values, labels=torch.tensor([0, 1]))
    with model.disable_adapter(), pytest.raises(InputError, match=r"Adapters are disabled"):
        fan_out(model, adapter_names=["one", "two"], pixel_values=pixel_values)
    with pytest.raises(InputError, match=r"PeftModel with surgical adapters"):
        fan_out(model.base_model.model, adapter_names=["one"], pixel_values=pixel_values)


# ------------------------------------------------------------------------------------------------------- compile
def test_switching_adapters_does_not_recompile() -> None:
    torch._dynamo.reset()
    model = _resnet()
    model.add_adapter("three", SurgicalConfig(block="stage1", init_weights=False))
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for name in ["one", "two", "three", "one", "two"]:
            model.set_adapter(name)
            eager = model(pixel_values=pixel_values).logits
            assert torch.equal(compiled(pixel_values=pixel_values).logits, eager)
    assert counter.frame_count == 1


def test_mixed_batches_under_compile_equal_eager_and_compile_once() -> None:
    torch._dynamo.reset()
    model = _resnet()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    pixel_values = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        compiled(pixel_values=pixel_values, adapter_names=["one", "two", "two", "one"])
        frames = counter.frame_count
        for names in [["two", "one", "one", "two"], ["one", "one", "two", "two"]]:
            mixed = compiled(pixel_values=pixel_values, adapter_names=names).logits
            assert _max_difference(mixed, model(pixel_values=pixel_values, adapter_names=names).logits) == 0
    assert counter.frame_count == frames  # other names, same blocks: nothing compiled again


def test_compiled_model_trains_as_eager() -> None:
    torch._dynamo.reset()
    pixel_values, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    trained = []
    for compile_it in [False, True]:
        model = _resnet()
        runner: Callable[..., Any] = torch.compile(model, backend="eager") if compile_it else model
        model.train()
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(2):
            runner(pixel_values=pixel_values, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        trained.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
    assert trained[0].keys() == trained[1].keys() and trained[0]
    assert all(_max_difference(trained[0][name], trained[1][name]) <= TOLERANCE for name in trained[0])
