"""Cached frozen features: run a model's frozen prefix once per example, then train only the rest.

Surgical fine-tuning of a deep block leaves every block in front of it frozen. PyTorch already runs that frozen
prefix without autograd: no parameter or input there requires grad, so no graph node is recorded, no activation is
kept for backward, and backward stops at the first trainable block (running the prefix under `torch.no_grad()`
instead measured no faster in `benchmarks/efficiency.py`, and held no less memory). What is left is the prefix's
forward compute, repeated every epoch on the same examples. With a deterministic input pipeline its output never
changes, so `FeatureCache` computes it once:

- the first time an example is seen, the forward runs as usual and the input of the first trainable block is kept
  for it (in memory, or in memory-mapped files on disk), up to `max_bytes`;
- once every example of a batch is cached, the prefix blocks do not run at all: for that call their `forward` returns
  a zero-stride placeholder of the right shape (no compute, no memory), and the first trainable block receives the
  cached features instead;
- in a batch mixing cached and new examples, the prefix runs on the new ones only.

Hidden states that the model returns for skipped blocks (`output_hidden_states=True`) are those placeholders.

While the cache is in use the prefix runs in eval mode (dropout off, BatchNorm on its running statistics), which is
what makes its output a function of the example alone; the surgical tuner keeps frozen BatchNorm in eval mode anyway.
Under DDP every process keeps the features of the examples it sees, keyed by their dataset index.

In a training loop (the examples need their dataset index, which `IndexedDataset` adds):

    cache = FeatureCache(model, deterministic=True, data=train_dataset, max_bytes=8 * 2**30)
    loader = DataLoader(IndexedDataset(train_dataset), batch_size=32, shuffle=True)
    for epoch in range(epochs):
        for batch in loader:
            with cache.batch(batch.pop("index")):
                loss = model(**batch).loss
            loss.backward()
            ...

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import SurgicalConfig
    >>> from surgical_peft.features import FeatureCache
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> model = get_peft_model(base, SurgicalConfig(block="head"))
    >>> cache = FeatureCache(model, deterministic=True, max_bytes=2**20)
    >>> images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 0, 1])
    >>> for epoch in range(2):
    ...     with cache.batch([0, 1, 2, 3]):
    ...         model(pixel_values=images, labels=labels).loss.backward()
    >>> cache.block, len(cache), cache.hits, cache.misses
    ('head', 4, 4, 4)
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import types
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .blocks import BlockMap, list_blocks, unwrap_model
from .blocks.block_map import parameters_under
from .errors import InputError
from .modes import held_in_eval

__all__ = ["FeatureCache", "IndexedDataset", "random_transforms"]

# Transforms that draw random numbers on every call, by class name: torchvision's and timm's `Random*`
# (RandomResizedCrop, RandomHorizontalFlip, RandomErasing, ...) and `RandAugment`, and these.
_RANDOM_TRANSFORMS = frozenset({"AugMix", "AutoAugment", "ColorJitter", "ElasticTransform", "GaussianBlur"})
# Attributes through which datasets, data loaders and transform pipelines reach their transforms.
_PIPELINE_ATTRIBUTES = ("dataset", "datasets", "transform", "transforms", "target_transform", "collate_fn", "format")
_SCAN_DEPTH = 8
_ATOMS = (str, bytes, int, float, bool, complex, type(None), torch.Tensor, types.ModuleType, type)


def _is_random_transform(obj: object) -> bool:
    name = type(obj).__name__
    return name.startswith("Rand") or name in _RANDOM_TRANSFORMS


def _names(code: types.CodeType) -> Iterator[str]:
    """The global (and attribute) names a function's code uses, comprehensions and inner functions included."""
    yield from code.co_names
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            yield from _names(constant)


def _children(obj: object) -> Iterator[tuple[str, object]]:
    """What a pipeline object refers to that may hold transforms, as (path suffix, object)."""
    if isinstance(obj, Mapping):
        yield from ((f"[{key!r}]", value) for key, value in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((f"[{index}]", value) for index, value in enumerate(obj))
    elif isinstance(obj, functools.partial):
        yield from ((".func", obj.func), (".args", obj.args), (".keywords", obj.keywords))
    elif isinstance(obj, types.MethodType):
        yield from ((".__func__", obj.__func__), (".__self__", obj.__self__))
    elif isinstance(obj, types.FunctionType):  # what a preprocessing function closes over or names as a global
        for name, cell in zip(obj.__code__.co_freevars, obj.__closure__ or (), strict=True):
            with contextlib.suppress(ValueError):  # a cell not filled yet
                yield f"<closure {name}>", cell.cell_contents
        globals_ = obj.__globals__
        yield from ((f"<global {name}>", globals_[name]) for name in _names(obj.__code__) if name in globals_)
        yield ".__defaults__", obj.__defaults__
    else:
        for name in _PIPELINE_ATTRIBUTES:
            try:
                value = getattr(obj, name, None)
            except Exception:  # a property that cannot be computed holds no transform we could see
                continue
            if value is not None and not isinstance(value, types.BuiltinMethodType):
                yield f".{name}", value


def random_transforms(data: object) -> list[str]:
    """Random transforms reachable from a dataset, data loader, transform or preprocessing function.

    Follows what input pipelines usually go through: a `DataLoader`'s dataset and collate function, `Subset` and
    `ConcatDataset`, a dataset's `transform`/`transforms`, a `Compose`'s list, `datasets.Dataset.with_transform`
    functions, and the closures, defaults and globals of preprocessing functions. A transform is random when its class
    is a torchvision/timm-style `Random*` or `RandAugment`, `AutoAugment`, `AugMix`, `ColorJitter`, `GaussianBlur`
    or `ElasticTransform`. Randomness hidden elsewhere (e.g. a `torch.rand` call in a function) is not found: that is
    what `FeatureCache(deterministic=True)` makes the caller vouch for.

    Args:
        data: the object the training examples come from.

    Returns:
        Where each random transform was found and its class name, e.g. `"data.transform.transforms[0]:
        RandomResizedCrop"`; empty when none was found.

    Example:
        >>> class RandomHorizontalFlip:
        ...     def __call__(self, image):
        ...         return image
        >>> class Compose:
        ...     def __init__(self, transforms):
        ...         self.transforms = transforms
        >>> random_transforms(Compose([RandomHorizontalFlip()]))
        ['data.transforms[0]: RandomHorizontalFlip']
    """
    found: list[str] = []
    seen: set[int] = set()
    stack: list[tuple[str, object, int]] = [("data", data, 0)]
    while stack:
        path, obj, depth = stack.pop()
        if isinstance(obj, _ATOMS) or id(obj) in seen or depth > _SCAN_DEPTH:
            continue
        seen.add(id(obj))
        if _is_random_transform(obj):
            found.append(f"{path}: {type(obj).__name__}")
            continue
        stack.extend((path + suffix, child, depth + 1) for suffix, child in reversed(list(_children(obj))))
    return found


class IndexedDataset(Dataset):
    """A map-style dataset of mappings, with each example's index added under `key` (for `FeatureCache.batch`).

    Args:
        dataset: a map-style dataset whose examples are mappings, e.g. `{"pixel_values": ..., "labels": ...}`.
        key: the name the index is added under.

    Example:
        >>> IndexedDataset([{"labels": 3}, {"labels": 5}])[1]
        {'labels': 5, 'index': 1}
    """

    def __init__(self, dataset: Dataset | Sequence[Mapping[str, Any]], key: str = "index") -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**self.dataset[index], self.key: index}


# ------------------------------------------------------------------------------------------------------ storage
class _MemoryStore:
    """Features kept in CPU memory, one tensor per example."""

    def __init__(self) -> None:
        self._rows: dict[int, torch.Tensor] = {}

    def __contains__(self, key: int) -> bool:
        return key in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def put(self, keys: Sequence[int], rows: torch.Tensor) -> None:
        for key, row in zip(keys, rows.to("cpu").unbind(0), strict=True):
            self._rows[key] = row.clone()  # its own storage: the batch's can go

    def get(self, keys: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._rows[key] for key in keys])

    def clear(self) -> None:
        self._rows.clear()


class _DiskStore:
    """Features in one file per stored batch under a fresh directory, read back memory-mapped; removed with it."""

    def __init__(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        self.path = Path(tempfile.mkdtemp(prefix=f"features-rank{rank}-", dir=directory))
        self._remove = weakref.finalize(self, shutil.rmtree, self.path, ignore_errors=True)
        self._shards: list[torch.Tensor] = []
        self._where: dict[int, tuple[int, int]] = {}  # key -> (shard, row)

    def __contains__(self, key: int) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def put(self, keys: Sequence[int], rows: torch.Tensor) -> None:
        file = self.path / f"shard-{len(self._shards):06d}.pt"
        # A compact copy: saving a view would write the whole storage it views.
        torch.save(rows.to("cpu", memory_format=torch.contiguous_format, copy=True), file)
        self._shards.append(torch.load(file, mmap=True, weights_only=True))
        self._where.update((key, (len(self._shards) - 1, row)) for row, key in enumerate(keys))

    def get(self, keys: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._shards[shard][row] for shard, row in map(self._where.__getitem__, keys)])

    def clear(self) -> None:
        self._shards.clear()
        self._where.clear()
        for file in self.path.iterdir():
            file.unlink()


# ------------------------------------------------------------------------------------------ placeholder outputs
@dataclass(frozen=True)
class _TensorSpec:
    """Shape (without the batch dimension) and dtype of a tensor in a prefix module's output."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def _map(obj: Any, leaf: type, fn: Callable[[Any], Any], module: str) -> Any:
    """`obj` with every `leaf` inside (nested tuples and lists) replaced by `fn(leaf)`."""
    if isinstance(obj, leaf):
        return fn(obj)
    if type(obj) in (tuple, list):
        return type(obj)(_map(item, leaf, fn, module) for item in obj)
    if isinstance(obj, (torch.Tensor, Mapping, Sequence)) and not isinstance(obj, (str, bytes, torch.Size)):
        raise TypeError(
            f"FeatureCache cannot skip {module}: its output holds a {type(obj).__name__}; only tensors, tuples and "
            "lists of them and plain values are supported."
        )
    return obj


def _keys(indices: torch.Tensor | Sequence[int]) -> list[int]:
    keys = indices.tolist() if isinstance(indices, torch.Tensor) else [int(index) for index in indices]
    if len(set(keys)) != len(keys):
        raise InputError(f"The example indices of a batch must be distinct, got {keys}.")
    return keys


def _check_settings(deterministic: bool, max_bytes: int, data: object) -> None:
    if deterministic is not True:
        raise InputError(
            "FeatureCache reuses each example's features in every epoch, which is only right when the input "
            "pipeline gives the same input every epoch (no random augmentation). Pass deterministic=True to "
            "vouch for that, or train without the cache."
        )
    if data is not None and (found := random_transforms(data)):
        raise InputError(
            "FeatureCache needs a deterministic input pipeline, but the data uses random transforms: "
            f"{'; '.join(found)}. Cached features would freeze one random draw per example. Train without the "
            "cache, or cache with a deterministic pipeline."
        )
    if max_bytes <= 0:
        raise InputError(f"max_bytes must be positive, got {max_bytes}.")


def _cached_block(model: nn.Module, blocks: BlockMap, block: str | None) -> str:
    """The block whose input is cached: `block`, or the first block with a parameter that requires grad."""
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    first_trainable = next((name for name in blocks if any(blocks.block_of(path) == name for path in trainable)), None)
    if first_trainable is None:
        raise InputError("No parameter of the model requires grad: there is nothing to train past a cache.")
    if block is None:
        block = first_trainable
    elif block not in blocks:
        raise InputError(f"Unknown block {block!r}. The model's blocks:\n{blocks}")
    names = list(blocks)
    if names.index(block) > names.index(first_trainable):
        raise InputError(f"Block {first_trainable!r}, before {block!r}, is trainable: it cannot be cached.")
    if names.index(block) == 0:
        raise InputError(f"{block!r} is the model's first block: there is no frozen prefix in front of it to cache.")
    return block


# --------------------------------------------------------------------------------------------------- the cache
class FeatureCache:
    """Computes a model's frozen prefix once per example and feeds the cached result to the trainable rest.

    The split point is the first block (in `surgical_peft.list_blocks` order) with a parameter that requires grad:
    the features cached are that block's input, one row per example. See the module docstring for how it works.

    Args:
        model: a `PeftModel` or a transformers model (possibly wrapped in DDP), with the parameters to train already
            requiring grad.
        deterministic: must be `True`: the caller vouches that an example's input is the same every epoch (no random
            augmentation), which caching relies on.
        max_bytes: bound on the cached features' bytes. Examples that do not fit are computed every time, with a
            warning once.
        directory: `None` keeps the features in CPU memory; a path keeps them in files in a fresh subdirectory of it,
            read back memory-mapped (the files go when the cache is cleared, the subdirectory when it is garbage
            collected).
        block: the block whose input is cached, when not the first trainable one: an earlier block (less is cached;
            nothing before it may require grad).
        data: the dataset, data loader or transform the examples come from, checked for random transforms
            (`random_transforms`).

    Raises:
        ValueError: if `deterministic` is not `True`, `data` holds random transforms, nothing is trainable, the split
            falls on the first block (no frozen prefix) or a block before `block` is trainable.

    Example:
        >>> import torch
        >>> from peft import get_peft_model
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from surgical_peft import SurgicalConfig
        >>> from surgical_peft.features import FeatureCache
        >>> config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        ...                    num_attention_heads=2, intermediate_size=32)
        >>> model = get_peft_model(ViTForImageClassification(config), SurgicalConfig(block="layer2"))
        >>> cache = FeatureCache(model, deterministic=True, max_bytes=2**20)
        >>> with cache.batch([7, 9]):
        ...     logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
        >>> cache.block, len(cache), cache.nbytes  # two rows of 17 tokens x 16 channels, float32
        ('layer2', 2, 2176)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        deterministic: bool,
        max_bytes: int,
        directory: str | os.PathLike | None = None,
        block: str | None = None,
        data: object = None,
    ) -> None:
        _check_settings(deterministic, max_bytes, data)
        base = unwrap_model(model)
        blocks = list_blocks(base)
        block = _cached_block(base, blocks, block)
        names = list(blocks)
        self.block = block
        self.max_bytes = max_bytes
        self.hits = 0
        self.misses = 0
        self._base = base
        modules = dict(base.named_modules())  # (a block may also name tensors a container owns, e.g. a ViT's)
        prefix_paths = [path for name in names[: names.index(block)] for path in blocks[name]]
        self._prefix = [modules[path] for path in prefix_paths if path in modules]
        self._entry = next(modules[path] for path in blocks[block] if path in modules)
        self._block_parameters = list(parameters_under(base, blocks[block]).values())
        self._prefix_tensors = [
            *(t for module in self._prefix for t in (*module.parameters(), *module.buffers())),
            *(base.get_parameter(path) for path in prefix_paths if path not in modules),
        ]
        self._templates: dict[int, Any] = {}  # prefix module position -> its output with tensors as _TensorSpec
        self._versions: list[int] | None = None  # of the prefix tensors when the cached features were computed
        self._full_warned = False
        self._row_bytes = 0  # of one example's features, known once the first is computed
        self._store = _MemoryStore() if directory is None else _DiskStore(directory)

    def __len__(self) -> int:
        """Number of examples cached."""
        return len(self._store)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached features."""
        return len(self._store) * self._row_bytes

    @property
    def directory(self) -> Path | None:
        """Where the feature files are (`None` in memory mode)."""
        return getattr(self._store, "path", None)

    def clear(self) -> None:
        """Forget every cached feature (and delete the files in disk mode)."""
        self._store.clear()
        self._templates.clear()
        self._versions = None
        self._full_warned = False

    # ----------------------------------------------------------------------------------------------- one batch
    @contextlib.contextmanager
    def batch(self, indices: torch.Tensor | Sequence[int]) -> Iterator[None]:
        """Run the one model forward inside the block with cached features for `indices`.

        Args:
            indices: the dataset index of every example in the batch, in batch order (e.g. from `IndexedDataset`).

        Raises:
            RuntimeError: if a parameter in front of the cached block requires grad (the trainable blocks changed
                since the cache was created: create a new one).

        Example:
            >>> import torch
            >>> from transformers import ResNetConfig, ResNetForImageClassification
            >>> from surgical_peft.features import FeatureCache
            >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
            >>> _ = model.requires_grad_(False).classifier.requires_grad_(True)  # hand-written freezing works too
            >>> cache = FeatureCache(model, deterministic=True, max_bytes=2**20)
            >>> with cache.batch(torch.tensor([0, 1])):
            ...     logits = model(torch.randn(2, 3, 32, 32)).logits
            >>> cache.misses, len(cache)
            (2, 2)
        """
        keys = _keys(indices)
        self._check_prefix()
        hit_rows = [row for row, key in enumerate(keys) if key in self._store]
        miss_rows = [row for row, key in enumerate(keys) if key not in self._store]
        self.hits += len(hit_rows)
        self.misses += len(miss_rows)
        handles = []
        stubbed: list[tuple[nn.Module, Any]] = []
        try:
            if miss_rows:
                handles += [
                    module.register_forward_hook(functools.partial(self._record_template, position))
                    for position, module in enumerate(self._prefix)
                ]
                if hit_rows:  # run the prefix on the uncached examples only
                    handles.append(
                        self._prefix[0].register_forward_pre_hook(functools.partial(self._select, keys, miss_rows))
                    )
            else:
                stubbed = self._stub_prefix(len(keys))
            handles.append(
                self._entry.register_forward_pre_hook(functools.partial(self._feed, keys, hit_rows, miss_rows))
            )
            with held_in_eval(self._prefix):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for module, forward in stubbed:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def _check_prefix(self) -> None:
        if any(isinstance(t, nn.Parameter) and t.requires_grad for t in self._prefix_tensors):
            raise RuntimeError(
                f"A parameter in front of block {self.block!r} requires grad now: the cached features would hide it "
                "from training. Create a new FeatureCache for the new trainable blocks."
            )
        if self._versions is not None and self._versions != [t._version for t in self._prefix_tensors]:
            warnings.warn(
                f"The weights in front of block {self.block!r} changed since their features were cached (another "
                "adapter loaded?); the cache was cleared.",
                stacklevel=3,
            )
            self.clear()

    def _device(self) -> torch.device:
        return self._block_parameters[0].device

    def _stub_prefix(self, batch_size: int) -> list[tuple[nn.Module, Any]]:
        """Replace each prefix module's `forward` by one returning placeholders; returns what to restore."""
        device = self._device()

        def placeholder(spec: _TensorSpec) -> torch.Tensor:
            return torch.zeros((), dtype=spec.dtype, device=device).expand(batch_size, *spec.shape)

        stubbed = []
        for position, module in enumerate(self._prefix):
            output = _map(self._templates[position], _TensorSpec, placeholder, type(module).__name__)
            stubbed.append((module, module.__dict__.get("forward")))  # e.g. Accelerate's hooked forward
            module.forward = lambda *args, _output=output, **kwargs: _output
        return stubbed

    def _record_template(self, position: int, module: nn.Module, args: Any, output: Any) -> None:
        def spec(tensor: torch.Tensor) -> _TensorSpec:
            return _TensorSpec(tuple(tensor.shape[1:]), tensor.dtype)

        self._templates[position] = _map(output, torch.Tensor, spec, type(module).__name__)

    @staticmethod
    def _select(keys: list[int], rows: list[int], module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        if not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != len(keys):
            raise InputError(
                f"{type(module).__name__} (the model's first block) must get a tensor with one row per example "
                f"({len(keys)}) as its first positional argument."
            )
        return (args[0][torch.tensor(rows, device=args[0].device)], *args[1:])

    def _feed(
        self, keys: list[int], hit_rows: list[int], miss_rows: list[int], module: nn.Module, args: tuple[Any, ...]
    ) -> tuple[Any, ...] | None:
        """Pre-hook of the cached block: store the newly computed rows, give it the full batch of features."""
        computed = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if computed is None or (miss_rows and computed.shape[0] != len(miss_rows)):
            raise InputError(
                f"Block {self.block!r} ({type(module).__name__}) must get a tensor with one row per example as its "
                "first positional argument for its input to be cached."
            )
        if miss_rows:
            self._put([keys[row] for row in miss_rows], computed.detach())
        if not hit_rows:
            return None
        cached = self._store.get([keys[row] for row in hit_rows]).to(self._device(), non_blocking=True)
        if not miss_rows:
            return (cached, *args[1:])
        features = cached.new_empty((len(keys), *cached.shape[1:]))
        features[hit_rows] = cached
        features[miss_rows] = computed.detach()
        return (features, *args[1:])

    def _put(self, keys: list[int], rows: torch.Tensor) -> None:
        new = [(position, key) for position, key in enumerate(keys) if key not in self._store]
        if not new:
            return
        self._row_bytes = rows[0].numel() * rows.element_size()
        room = max((self.max_bytes - self.nbytes) // self._row_bytes, 0)
        if new[:room]:
            self._store.put([key for _, key in new[:room]], rows[[position for position, _ in new[:room]]])
            self._versions = [t._version for t in self._prefix_tensors]
        if room < len(new) and not self._full_warned:
            warnings.warn(
                f"FeatureCache reached max_bytes={self.max_bytes:,} with {len(self)} examples of {self._row_bytes:,} "
                "bytes each; examples not cached are computed every time.",
                stacklevel=2,
            )
            self._full_warned = True
