"""`SurgicalLayer`: the base snapshot and per-adapter deltas of the tensors one module owns (or of one of them).

Surgical fine-tuning trains a block's own weights, so unlike LoRA there is no extra layer in the forward pass: the
model keeps its structure and its modules compute exactly as before, at the same cost. What a `SurgicalLayer` adds,
for one module of a tuned block, is bookkeeping, held by the tuner (not inside the model) so that PEFT's status tools
(`get_model_status`, `disable_adapter`) see it while `.to(device)` and `state_dict()` never do:

- `base`: a snapshot of the tensors the module owns directly (parameters and persistent buffers, such as BatchNorm
  running statistics), kept off the accelerator and out of resident memory: it lives in an unlinked temporary file,
  memory-mapped, so it costs disk (page cache) rather than RAM until it is read (to save, switch or unload);
- `stashed`: for every trained adapter whose weights are *not* currently in the module, those weights (CPU), kept
  as they were so that switching back and forth is exact;
- `loaded`: the adapters whose weights the module holds now: none (the base weights), one (it trains in place: its
  delta is the live tensor minus the snapshot), or several, active together (PEFT's several active adapters): the
  module then holds the base plus the sum of their deltas, for inference, and each adapter's own weights stay stashed.

A module that owns tensors directly *and* holds submodules with tensors of their own (a container, such as a timm
ViT, which owns `cls_token` and `pos_embed` beside its blocks, or transformers' `ViTEmbeddings`) gets one layer per
tensor it owns (`names`), because such tensors belong to different blocks than the module's children
(`surgical_peft.tuner.targets`).

Example:
    >>> import torch
    >>> from surgical_peft.tuner.layer import SurgicalLayer
    >>> linear = torch.nn.Linear(2, 2)
    >>> _ = torch.nn.init.constant_(linear.weight, 0.5)  # exact arithmetic below
    >>> layer = SurgicalLayer(linear)
    >>> layer.add_adapter("a"); layer.add_adapter("b"); layer.load("a")
    >>> with torch.no_grad():
    ...     _ = linear.weight.add_(1.0)
    >>> bool((layer.delta("a")["weight"] == 1).all())
    True
    >>> layer.load()  # back to the base weights; "a" keeps its delta
    >>> bool((layer.delta("a")["weight"] == 1).all()), bool(torch.equal(linear.weight, layer.base["weight"]))
    (True, True)
    >>> layer.set_delta("b", {"weight": torch.full((2, 2), 2.0), "bias": torch.zeros(2)})
    >>> layer.load("a", "b")  # both: the base plus the sum of their deltas
    >>> bool((linear.weight == 0.5 + 1 + 2).all()), layer.loaded
    (True, ('a', 'b'))
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from ..blocks.paths import join
from ..errors import InputError
from ._internals import BaseTunerLayer, in_out_features, persistent_buffer_names
from .serialization import KEY_PREFIX

__all__ = ["RANDOM_INIT_SCALE", "SurgicalLayer", "deduplicate_state_dict"]

RANDOM_INIT_SCALE = 0.02
"""Standard deviation of `init_weights=False`'s random deltas, relative to each tensor's own."""


def owned_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters and persistent buffers that `module` holds directly (not through a child)."""
    yield from module.named_parameters(recurse=False)
    for name in persistent_buffer_names(module):
        yield name, module.get_buffer(name)


def _distributed() -> bool:
    """Whether this process is one of several (torch.distributed)."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def _offloaded_copy(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU copies of `tensors`, memory-mapped from an unlinked temporary file (a plain copy if that fails)."""
    try:
        with tempfile.NamedTemporaryFile(prefix="surgical-base-", suffix=".pt") as file:
            torch.save({name: tensor.detach().cpu() for name, tensor in tensors.items()}, file)
            file.flush()
            return torch.load(file.name, mmap=True, weights_only=True)  # the mapping outlives the file's name
    except (OSError, RuntimeError):  # no writable temporary directory, or no mmap: copies in memory
        return {name: tensor.detach().to("cpu", copy=True) for name, tensor in tensors.items()}


class _AdapterParameters(nn.Module):
    """The live parameters of the one adapter a module holds, listed under the adapter's name (PEFT's naming:
    `surgical_layers.<module>.tuned.<adapter>.weight`). They are the module's own parameters, not copies: a state
    dict holds them under both names (as tied weights), and a state dict without these names (the model's own, an
    older checkpoint) loads without missing keys, since the model's names carry the same tensors."""

    def _load_from_state_dict(
        self, state_dict: Mapping, prefix: str, metadata: dict, strict: bool, missing: list, *args: object
    ) -> None:
        super()._load_from_state_dict(state_dict, prefix, metadata, strict, [], *args)


def deduplicate_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Leave one name per tensor in `state_dict` (`model.state_dict()`, in place), which names every tuned tensor
    twice (see `_AdapterParameters`): its adapter's name is kept and the model's own name dropped. safetensors cannot
    hold a tensor twice, and its `load_model` (what Accelerate's `load_state` runs) matches a file against the model
    by the adapter's names: a model name is reported missing, and so forgiven as a duplicate, where an adapter name
    is not. `model` may be wrapped (DDP's `module.` prefix is kept).

    Example:
        >>> from peft import get_peft_model
        >>> from surgical_peft import SurgicalConfig
        >>> model = get_peft_model(nn.Sequential(nn.Linear(2, 2)), SurgicalConfig(target_modules=["0"]))
        >>> state_dict = model.state_dict()
        >>> deduplicate_state_dict(model, state_dict)
        >>> sorted(state_dict)
        ['base_model.surgical_layers.0.tuned.default.bias', 'base_model.surgical_layers.0.tuned.default.weight']
    """
    adapter_names = {
        f"{name}.{tensor}"
        for name, module in model.named_modules()
        if isinstance(module, _AdapterParameters)
        for tensor in module._parameters
    }
    tuned = {state_dict[key].data_ptr() for key in adapter_names if key in state_dict}
    for key in [key for key, tensor in state_dict.items() if key not in adapter_names and tensor.data_ptr() in tuned]:
        del state_dict[key]


class SurgicalLayer(nn.Module, BaseTunerLayer):
    """Base snapshot and per-adapter deltas of the tensors one module owns directly (see the module docstring).

    Example:
        >>> from peft import get_peft_model
        >>> from torch import nn
        >>> from surgical_peft import SurgicalConfig
        >>> base = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
        >>> model = get_peft_model(base, SurgicalConfig(target_modules=["1"]))
        >>> layer = model.base_model.surgical_layers["1"]  # the tuner's layer for module "1"
        >>> list(layer.tensor_paths.values()), layer.loaded
        (['1.weight', '1.bias', '1.running_mean', '1.running_var', '1.num_batches_tracked'], ('default',))
    """

    def __init__(self, module: nn.Module, path: str = "", names: tuple[str, ...] | None = None) -> None:
        """Bookkeeping for the tensors that `module` (at `path` in the model) owns directly: all of them, or only
        `names`."""
        super().__init__()
        # Plain attributes, not submodules or buffers: the tuned module stays in the model only, and the snapshot
        # stays on the CPU whatever device the model moves to.
        object.__setattr__(self, "module", module)
        # tensor name on the module -> its path in the model, which is also its key in the adapter file
        self.tensor_paths = {n: join(path, n) for n, _ in owned_tensors(module) if names is None or n in names}
        self.base: dict[str, torch.Tensor] = _offloaded_copy(self.tensors())
        # An adapter with no entry here is either loaded or has the base weights (a zero delta, stored lazily).
        self.stashed: dict[str, dict[str, torch.Tensor]] = {}
        self.adapters: set[str] = set()
        self.loaded: tuple[str, ...] = ()  # () the base weights, (a,) adapter a's, (a, b, ...) the sum of their deltas
        self.merged_adapters: list[str] = []  # PEFT's view: the loaded adapters once `merge_adapter` declared them
        # The sizes PEFT's layers expose (None where the module has none, e.g. a norm).
        self.in_features, self.out_features = in_out_features(module)
        self.tuned = nn.ModuleDict()  # the loaded adapter's name -> the module's live parameters (see `_name`)

    # BaseTunerLayer's view, for PEFT's status tools: `active_adapter` and `disable_adapters` report the tuner's state
    # (set through `set_status`), the same on every layer as PEFT expects, whether or not this layer's module belongs
    # to the active adapter. Merging is meaningless because the tuned weights are always the module's own.
    def set_status(self, active_adapters: list[str], enabled: bool) -> None:
        """Record the tuner's active adapters and whether adapters are enabled."""
        self._active_adapter = list(active_adapters)
        self._disable_adapters = not enabled

    def _get_available_adapters(self) -> set[str]:
        return set(self.adapters)

    def get_base_layer(self) -> nn.Module:
        """The tuned module (PEFT asks for it, e.g. to move adapter weights to its device; there are none to move)."""
        return self.module

    # PEFT's conversion contract (`peft.convert_to_lora`, routed to `surgical_peft.convert_to_lora`).
    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Always: a surgical adapter converts to LoRA (`surgical_peft.convert_to_lora`) as LoRA factors where LoRA's
        layers can express a module's change, and as a `modules_to_save` copy where they cannot (norms, BatchNorm
        statistics, a container's tensors)."""
        return True

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The change `adapter_name` makes to the module's `weight` (tuned - base), in the module's own layout (a
        transformers `Conv1D`'s is (in, out)), as PEFT's delta-weight layers give it."""
        if "weight" not in self.tensor_paths:
            raise InputError(
                f"This layer tunes {sorted(self.tensor_paths.values())}, no `weight`: it has no delta weight."
            )
        return self.delta(adapter_name)["weight"]

    def forward(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("A SurgicalLayer holds bookkeeping only; the tuned module runs inside the model.")

    def extra_repr(self) -> str:
        return f"{type(self.module).__name__}, adapters={sorted(self.adapters)}, loaded={self.loaded!r}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """The live tensors this layer keeps track of, by their name on the module."""
        return {name: tensor for name, tensor in owned_tensors(self.module) if name in self.tensor_paths}

    @property
    def file_keys(self) -> dict[str, str]:
        """Tensor name on the module -> its key in the adapter file."""
        return {name: KEY_PREFIX + path for name, path in self.tensor_paths.items()}

    def keyed(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This layer's entries of an adapter `state_dict` (keyed as in the adapter file), by tensor name."""
        return {name: state_dict[key] for name, key in self.file_keys.items()}

    def weights(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """The tensors the module holds under `adapter_name` (`None`: the base), by tensor name, without loading it:
        the live tensors where that adapter alone is loaded, else its stashed copy or the base snapshot (both on the
        CPU). For running several adapters side by side (`surgical_peft.serving`); read-only.

        Example:
            >>> linear = torch.nn.Linear(1, 1)
            >>> layer = SurgicalLayer(linear)
            >>> layer.add_adapter("a")
            >>> layer.set_delta("a", {"weight": torch.ones(1, 1), "bias": torch.zeros(1)})
            >>> bool(layer.weights("a")["weight"] == layer.weights()["weight"] + 1), layer.loaded
            (True, ())
        """
        if adapter_name is None:
            return dict(self.base)
        if adapter_name not in self.adapters:
            raise InputError(
                f"Adapter {adapter_name!r} does not tune this module (its adapters: {sorted(self.adapters)})."
            )
        if (adapter_name,) == self.loaded:
            return self.tensors()
        return dict(self.stashed.get(adapter_name, self.base))

    def add_adapter(self, adapter_name: str) -> None:
        """Register an adapter with a zero delta."""
        self.adapters.add(adapter_name)

    def init_random(self, adapter_name: str, scale: float = RANDOM_INIT_SCALE) -> None:
        """Give `adapter_name` small random deltas (PEFT's `init_weights=False`): each floating-point parameter gets
        noise from N(0, (scale * std)^2), with `std` the base tensor's standard deviation (1 where it is constant, such
        as a LayerNorm's ones), drawn from torch's global RNG; buffers (BatchNorm statistics) keep the base values."""
        parameters = dict(self.module.named_parameters(recurse=False))
        delta = {}
        for name, base in self.base.items():
            delta[name] = torch.zeros_like(base)
            if name in parameters and base.is_floating_point():
                std = base.float().std().item() if base.numel() > 1 else 0.0
                delta[name] = torch.randn(base.shape).to(base.dtype) * scale * (std if std > 0 else 1.0)
        self.set_delta(adapter_name, delta)

    def delta(self, adapter_name: str, live: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """`tuned - base` of `adapter_name`, on the CPU; `live` overrides the module's tensors (e.g. gathered ones)."""
        if (adapter_name,) == self.loaded:
            tuned = {**self.tensors(), **(live or {})}
        else:
            tuned = self.stashed.get(adapter_name, self.base)
        return {name: tuned[name].detach().to("cpu") - base for name, base in self.base.items()}

    @torch.no_grad()
    def set_delta(self, adapter_name: str, delta: Mapping[str, torch.Tensor]) -> None:
        """Give `adapter_name` the weights `base + delta` (a loaded sum it is a term of is rewritten)."""
        # (in float32 where the deltas are and the base is half precision: PEFT's autocast, `precision`)
        dtypes = {name: torch.promote_types(base.dtype, delta[name].dtype) for name, base in self.base.items()}
        tuned = {name: base.to(dtypes[name]) + delta[name].to("cpu", dtypes[name]) for name, base in self.base.items()}
        if (adapter_name,) == self.loaded:
            self._write(tuned)
            return
        self.stashed[adapter_name] = tuned
        if adapter_name in self.loaded:
            self._write(self._sum(self.loaded))

    def _sum(self, adapter_names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """`base + delta_a + delta_b + ...` of stashed (or untrained) adapters, on the CPU."""
        tuned = [self.stashed.get(name, self.base) for name in adapter_names]
        return {name: base + sum(weights[name] - base for weights in tuned) for name, base in self.base.items()}

    def hold_saved(
        self, adapter_name: str, saved: Mapping[str, torch.Tensor], live: Mapping[str, torch.Tensor]
    ) -> None:
        """Give the module exactly the weights that loading `saved` (the deltas just saved for `adapter_name`) gives
        back, so that a run resumed from the file (`Trainer(resume_from_checkpoint=...)`) continues from the very
        weights this run continues from. `base + (tuned - base)` is `tuned` only up to rounding (one unit in the last
        place where a weight shrank by half or changed sign), and training amplifies such differences. Done when it
        is a rounding only: for the loaded adapter, every delta in its tensor's dtype, and `live` (the state dict that
        was saved) the module's own tensors, not gathered FSDP or DeepSpeed shards; and in a single process (under
        DDP only the main process saves, and replicas must not drift apart).

        Example:
            >>> linear = torch.nn.Linear(1, 1)
            >>> _ = torch.nn.init.ones_(linear.weight)
            >>> layer = SurgicalLayer(linear)
            >>> layer.add_adapter("a"); layer.load("a")
            >>> _ = torch.nn.init.constant_(linear.weight, 0.1)
            >>> saved = layer.delta("a")  # 0.1 - 1, and 1 + (0.1 - 1) is not 0.1 in float32
            >>> bool(torch.equal(layer.base["weight"] + saved["weight"], linear.weight))
            False
            >>> layer.hold_saved("a", saved, layer.tensors())
            >>> bool(torch.equal(layer.base["weight"] + saved["weight"], linear.weight))
            True
        """
        own = self.tensors()
        if (
            (adapter_name,) != self.loaded  # (a sum of several adapters is for inference, never trained)
            or _distributed()
            or any(
                saved[name].dtype != tensor.dtype
                or live.get(name, tensor).data_ptr() != tensor.data_ptr()
                or live.get(name, tensor).shape != tensor.shape
                for name, tensor in own.items()
            )
        ):
            return
        self.set_delta(adapter_name, saved)

    @torch.no_grad()
    def _write(self, values: Mapping[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors().items():
            tensor.copy_(values[name].to(tensor.device, tensor.dtype))

    def load(self, *adapter_names: str) -> None:
        """Put the weights of `adapter_names` into the module: none, the base weights; one, that adapter's; several,
        the base plus the sum of their deltas. A single adapter's current weights are stashed first."""
        if adapter_names == self.loaded:
            return
        unknown = [name for name in adapter_names if name not in self.adapters]
        if unknown:
            raise InputError(f"Adapter(s) {unknown} do not tune this module; its adapters: {sorted(self.adapters)}.")
        held = self.loaded
        if len(held) == 1:  # it trained in place; a sum's terms are stashed already
            self.stashed[held[0]] = {name: t.detach().to("cpu", copy=True) for name, t in self.tensors().items()}
        if len(adapter_names) == 1:
            target = self.stashed.pop(adapter_names[0], None)
        else:
            target = self._sum(adapter_names) if adapter_names else None
        if target is not None or held:  # an untrained adapter on the base weights: nothing to write
            self._write(self.base if target is None else target)
        self.loaded = adapter_names
        self._name()

    def _name(self) -> None:
        """Register the module's live parameters under the loaded adapter's name when one adapter is loaded (as PEFT
        names an adapter's parameters), so that the model's parameters list them there: `named_parameters()` keeps
        the first name of a parameter, and the tuner lists its layers before the model."""
        self.tuned.clear()
        if len(self.loaded) != 1 or not self.loaded[0] or "." in self.loaded[0]:  # (not a valid module name)
            return
        own = _AdapterParameters()
        # Set directly, not with `register_parameter`, which accelerate's `init_empty_weights` (PEFT's
        # `low_cpu_mem_usage`) replaces with one that registers a copy on the meta device.
        own._parameters = {n: p for n, p in self.module.named_parameters(recurse=False) if n in self.tensor_paths}
        self.tuned[self.loaded[0]] = own

    def delete_adapter(self, adapter_name: str) -> None:
        """Forget `adapter_name`; the module holds the other loaded adapters' weights (or the base) without it."""
        if adapter_name in self.loaded:
            self.load(*(name for name in self.loaded if name != adapter_name))
        self.stashed.pop(adapter_name, None)
        self.adapters.discard(adapter_name)
