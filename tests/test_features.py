"""The frozen prefix runs without autograd; `FeatureCache` trains exactly as without it and refuses what it cannot."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import datasets
import pytest
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from torch.utils.data import DataLoader

from surgical_peft import SurgicalConfig, list_blocks
from surgical_peft.features import FeatureCache, IndexedDataset, random_transforms

# Epochs of example indices: the first fills the cache; the second mixes cached and new examples in one batch and
# reorders a cached batch; the third regroups cached examples into a new batch.
EPOCHS = [[[0, 1, 2, 3], [4, 5, 6, 7]], [[3, 2, 8, 9], [7, 6, 5, 4]], [[9, 8, 1, 0]]]
EXAMPLES = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
LABELS = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])


def surgical(make_model: Callable[..., nn.Module], arch: str, block: str) -> PeftModel:
    # Stochastic depth (BEiT, Swin) is off: the cache runs the prefix in eval mode, uncached training would not.
    model = get_peft_model(make_model(arch, drop_path_rate=0.0), SurgicalConfig(block=block))
    return model.train()


def train(model: nn.Module, cache: FeatureCache | None = None) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """SGD over `EPOCHS`; the logits and gradients of every step."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    steps = []
    for epoch in EPOCHS:
        for indices in epoch:
            with cache.batch(indices) if cache is not None else nullcontext():
                outputs = model(pixel_values=EXAMPLES[indices], labels=LABELS[indices])
            outputs.loss.backward()
            steps.append((outputs.logits.detach(), [p.grad.clone() for p in parameters]))
            optimizer.step()
            optimizer.zero_grad()
    return steps


def assert_same_training(expected: list, actual: list) -> None:
    assert len(expected) == len(actual)
    for (logits, grads), (cached_logits, cached_grads) in zip(expected, actual, strict=True):
        torch.testing.assert_close(cached_logits, logits, rtol=0, atol=1e-6)
        for grad, cached_grad in zip(grads, cached_grads, strict=True):
            torch.testing.assert_close(cached_grad, grad, rtol=0, atol=1e-6)


def prefix_modules(model: nn.Module, block: str) -> list[nn.Module]:
    blocks = list_blocks(model)
    base = model.get_base_model()
    names = list(blocks)
    return [base.get_submodule(path) for name in names[: names.index(block)] for path in blocks[name]]


# ------------------------------------------------------------------------------------------- the frozen prefix
@pytest.mark.parametrize("block", ["later", "head"])
def test_frozen_prefix_records_no_graph(arch: str, block: str, make_model: Callable[..., nn.Module]) -> None:
    """No tensor is saved for backward while the frozen prefix runs, and the tuned block gets a graph-free input."""
    blocks = list(list_blocks(make_model(arch)))
    block = blocks[-3] if block == "later" else block
    model = surgical(make_model, arch, block)
    prefix = prefix_modules(model, block)
    entry = model.get_base_model().get_submodule(list_blocks(model)[block][0])
    state = {"in_prefix": False, "saved_in_prefix": 0, "saved_after": 0}
    seen_inputs: list[torch.Tensor] = []

    def enter(*_: object) -> None:
        state["in_prefix"] = True

    def leave(module: nn.Module, args: tuple) -> None:
        state["in_prefix"] = False
        seen_inputs.append(args[0])

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        state["saved_in_prefix" if state["in_prefix"] else "saved_after"] += 1
        return tensor

    hooks = [prefix[0].register_forward_pre_hook(enter), entry.register_forward_pre_hook(leave)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(pixel_values=EXAMPLES[:4], labels=LABELS[:4])
    for hook in hooks:
        hook.remove()
    outputs.loss.backward()

    assert state["saved_in_prefix"] == 0
    assert state["saved_after"] > 0  # the hooks do see what the tuned part saves
    assert not seen_inputs[0].requires_grad and seen_inputs[0].grad_fn is None  # backward stops at the block
    assert all(p.grad is None for module in prefix for p in module.parameters())


# ---------------------------------------------------------------------------------------------- cached training
@pytest.mark.parametrize("block", ["later", "head"])
def test_cached_training_matches_uncached(arch: str, block: str, make_model: Callable[..., nn.Module]) -> None:
    block = list(list_blocks(make_model(arch)))[-3] if block == "later" else block
    expected = train(surgical(make_model, arch, block))
    model = surgical(make_model, arch, block)
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30)
    assert_same_training(expected, train(model, cache))
    assert (len(cache), cache.misses, cache.hits) == (10, 10, 10)


def test_cached_batches_skip_the_prefix(make_model: Callable[..., nn.Module]) -> None:
    """All cached: no prefix module runs; partly cached: the prefix runs on the new examples only."""
    model = surgical(make_model, "resnet-bottleneck", "stage2")
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30)
    rows: list[int] = []
    convolutions = [m for module in prefix_modules(model, "stage2") for m in module.modules() if type(m) is nn.Conv2d]
    for convolution in convolutions:
        convolution.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    runs = {}
    for name, indices in (("new", [0, 1, 2, 3]), ("cached", [3, 1, 0, 2]), ("partly", [0, 8, 1, 9])):
        rows.clear()
        with cache.batch(indices):
            model(pixel_values=EXAMPLES[indices])
        runs[name] = set(rows)
    assert runs == {"new": {4}, "cached": set(), "partly": {2}}


def test_model_is_restored_after_each_batch(make_model: Callable[..., nn.Module]) -> None:
    model = surgical(make_model, "vit", "layer2")
    with torch.no_grad():
        expected = model(pixel_values=EXAMPLES[:2]).logits
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30)
    modules = list(model.modules())

    def state() -> list[tuple]:
        return [(m.training, len(m._forward_hooks), len(m._forward_pre_hooks), "forward" in vars(m)) for m in modules]

    before = state()
    with cache.batch([0, 1]):
        model(pixel_values=EXAMPLES[:2])
    assert state() == before
    with pytest.raises(RuntimeError, match="boom"), cache.batch([0, 1]):  # cached: the prefix is stubbed
        raise RuntimeError("boom")
    assert state() == before
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=EXAMPLES[:2]).logits, expected, rtol=0, atol=0)


def test_training_loop_with_a_data_loader(make_model: Callable[..., nn.Module]) -> None:
    """The documented loop: hand-written freezing, `IndexedDataset`, indices popped from the batch."""
    model = make_model("resnet-basic").train()
    model.requires_grad_(False).classifier.requires_grad_(True)
    examples = [{"pixel_values": EXAMPLES[i], "labels": LABELS[i]} for i in range(8)]
    cache = FeatureCache(model, deterministic=True, data=examples, max_bytes=2**30)
    loader = DataLoader(IndexedDataset(examples), batch_size=4, shuffle=True)
    for _ in range(2):
        for batch in loader:
            with cache.batch(batch.pop("index")):
                loss = model(**batch).loss
            loss.backward()
    assert (cache.block, len(cache), cache.hits, cache.misses) == ("head", 8, 8, 8)


# -------------------------------------------------------------------------------------------------- refusals
class RandomHorizontalFlip:
    """Stands in for torchvision's: a random transform, by its name."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1) if torch.rand(()) < 0.5 else image


class Normalize:
    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - 0.5) / 0.5


class Compose:
    def __init__(self, transforms: list) -> None:
        self.transforms = transforms


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, transform: Compose) -> None:
        self.transform = transform


TRAIN_TRANSFORMS = Compose([RandomHorizontalFlip(), Normalize()])


def preprocess(batch: dict) -> dict:  # the Hugging Face examples' style: a global pipeline used by a function
    batch["pixel_values"] = [TRAIN_TRANSFORMS.transforms[0](image) for image in batch["pixel_values"]]
    return batch


def random_pipelines() -> dict[str, object]:
    flip = RandomHorizontalFlip()
    hf_dataset = datasets.Dataset.from_dict({"pixel_values": [[0.0]]}).with_transform(lambda batch: flip(batch))
    return {
        "compose": Compose([Normalize(), flip]),
        "data loader": DataLoader(torch.utils.data.Subset(ImageFolder(Compose([flip])), [0])),
        "global": preprocess,
        "datasets.with_transform": hf_dataset,
    }


@pytest.mark.parametrize("pipeline", list(random_pipelines()))
def test_refuses_random_transforms(pipeline: str, make_model: Callable[..., nn.Module]) -> None:
    data = random_pipelines()[pipeline]
    assert random_transforms(data)
    with pytest.raises(ValueError, match="RandomHorizontalFlip"):
        FeatureCache(surgical(make_model, "vit", "head"), deterministic=True, max_bytes=2**20, data=data)


def test_requires_a_declared_deterministic_pipeline(make_model: Callable[..., nn.Module]) -> None:
    model = surgical(make_model, "vit", "head")
    with pytest.raises(ValueError, match="deterministic=True"):
        FeatureCache(model, deterministic=False, max_bytes=2**20)
    assert random_transforms(ImageFolder(Compose([Normalize()]))) == []
    FeatureCache(model, deterministic=True, max_bytes=2**20, data=ImageFolder(Compose([Normalize()])))


def test_refuses_what_it_cannot_cache(make_model: Callable[..., nn.Module]) -> None:
    with pytest.raises(ValueError, match="no frozen prefix"):
        FeatureCache(surgical(make_model, "vit", "embeddings"), deterministic=True, max_bytes=2**20)
    with pytest.raises(ValueError, match="is trainable"):
        FeatureCache(surgical(make_model, "vit", "layer1"), deterministic=True, max_bytes=2**20, block="head")
    with pytest.raises(ValueError, match="requires grad"):
        FeatureCache(make_model("vit").requires_grad_(False), deterministic=True, max_bytes=2**20)
    model = surgical(make_model, "vit", "head")
    cache = FeatureCache(model, deterministic=True, max_bytes=2**20)
    with pytest.raises(ValueError, match="distinct"), cache.batch([1, 1]):
        pass
    with pytest.raises(ValueError, match="one row per example"), cache.batch([0, 1, 2]):
        model(pixel_values=EXAMPLES[:2])
    model.base_model.model.vit.layers[0].requires_grad_(True)
    with pytest.raises(RuntimeError, match="Create a new FeatureCache"), cache.batch([0, 1]):
        pass


def test_an_earlier_block_can_be_cached(make_model: Callable[..., nn.Module]) -> None:
    expected = train(surgical(make_model, "resnet-basic", "head"))
    model = surgical(make_model, "resnet-basic", "head")
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30, block="stage2")
    assert_same_training(expected, train(model, cache))
    assert cache.block == "stage2"


def test_changed_prefix_weights_clear_the_cache(make_model: Callable[..., nn.Module]) -> None:
    model = surgical(make_model, "resnet-basic", "head")
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30)
    with cache.batch([0, 1]):
        model(pixel_values=EXAMPLES[:2])
    with torch.no_grad():
        model.base_model.model.resnet.embedder.embedder.convolution.weight.mul_(2)
    with pytest.warns(UserWarning, match="cache was cleared"), cache.batch([0, 1]):
        logits = model(pixel_values=EXAMPLES[:2]).logits
    torch.testing.assert_close(logits, model(pixel_values=EXAMPLES[:2]).logits)
    assert (cache.hits, cache.misses) == (0, 4)


# ---------------------------------------------------------------------------------------------- size and disk
def test_size_bound(make_model: Callable[..., nn.Module]) -> None:
    """Past `max_bytes`, examples are not cached (with one warning) and are computed every time, still exactly."""
    expected = train(surgical(make_model, "resnet-bottleneck", "stage2"))
    model = surgical(make_model, "resnet-bottleneck", "stage2")
    row_bytes = 16 * 8 * 8 * 4  # the input of stage2: 16 channels, 8x8, float32
    cache = FeatureCache(model, deterministic=True, max_bytes=3 * row_bytes + row_bytes // 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = train(model, cache)
    assert_same_training(expected, actual)
    assert (len(cache), cache.nbytes) == (3, 3 * row_bytes)
    full = [str(w.message) for w in caught if "reached max_bytes" in str(w.message)]
    assert len(full) == 1 and f"with 3 examples of {row_bytes:,} bytes each" in full[0]


def test_disk_mode(make_model: Callable[..., nn.Module], tmp_path: object) -> None:
    expected = train(surgical(make_model, "vit", "layer2"))
    model = surgical(make_model, "vit", "layer2")
    cache = FeatureCache(model, deterministic=True, max_bytes=2**30, directory=tmp_path / "features")
    assert_same_training(expected, train(model, cache))
    directory = cache.directory
    assert directory.parent == tmp_path / "features" and directory.name.startswith("features-rank0-")
    files = sorted(directory.iterdir())
    assert len(files) == 3  # one per batch with new examples
    assert sum(torch.load(f, weights_only=True).shape[0] for f in files) == len(cache) == 10
    assert cache.nbytes == 10 * 17 * 16 * 4  # 17 tokens x 16 channels, float32
    cache.clear()
    assert len(cache) == 0 and not any(directory.iterdir())
    del cache
    gc.collect()
    assert not directory.exists()


def test_fine_tune_with_cached_features_matches_uncached() -> None:
    """`FineTuneArguments(cache_features=True)`: the same weights as without the cache, in fewer prefix forwards."""
    from transformers import ResNetConfig, ResNetForImageClassification

    from surgical_peft.training import FineTuneArguments, fine_tune

    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2, layer_type="basic")
    data = [
        {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), "labels": i % 2}
        for i in range(16)
    ]
    results = []
    for cache_features in (False, True):
        torch.manual_seed(0)
        args = FineTuneArguments(
            blocks=["stage2"], epochs=2, batch_size=4, progress=False, cache_features=cache_features
        )
        results.append(fine_tune(ResNetForImageClassification(config), data, None, args).model)
    plain, cached = (dict(model.named_parameters()) for model in results)
    for name, parameter in plain.items():
        torch.testing.assert_close(cached[name], parameter, rtol=1e-5, atol=1e-6)
