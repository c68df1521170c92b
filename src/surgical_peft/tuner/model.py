"""`SurgicalModel`: the PEFT tuner that fine-tunes chosen blocks of a model in place and saves only their deltas."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from ..blocks import ALL, AUTO, BlockMap, is_under, list_blocks
from ..blocks.paths import from_key, join, to_key
from ..errors import InputError, few
from ._internals import (
    DUMMY_TARGET_MODULES,
    NORMS_WITH_RUNNING_STATS,
    AuxiliaryTrainingWrapper,
    BaseTuner,
    NoMatchingPeftModuleError,
    delete_auxiliary_adapter,
    set_auxiliary_adapter,
)
from .checkpointing import compose
from .config import SurgicalConfig
from .fingerprint import check_fingerprint, fingerprint
from .layer import SurgicalLayer, owned_tensors
from .precision import Upcasts
from .quantized import FullPrecisionBlocks, full_precision_like
from .serialization import (
    KEY_PREFIX,
    check_announced,
    check_delta_state_dict,
    check_finite,
    check_weights_data,
    label_names,
    weights_file,
)
from .targets import bias_targets, owns_loose_tensors, targets_saved_in_full, tensor_targets

__all__ = ["SurgicalModel"]

_LONG_LIST = 100  # names in target_modules or exclude_modules beyond which only those that can match are matched


class SurgicalModel(BaseTuner):
    """Surgical fine-tuning (Lee et al., ICLR 2023) as a PEFT tuner. Created by `peft.get_peft_model`.

    The tuned blocks are trained in place: the model keeps its modules and its speed, and only the parameters of the
    active adapter's blocks require grad. Each tuned module gets a `SurgicalLayer` that keeps the base weights and the
    other adapters' deltas on the CPU. Frozen normalisation layers with running statistics (BatchNorm) always run in
    eval mode, so their statistics cannot drift while the model trains; the tuned blocks' own statistics train and are
    saved with the deltas.

    Example:
        >>> from peft import get_peft_model
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import SurgicalConfig
        >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> model = get_peft_model(base, SurgicalConfig(block="stage1"))
        >>> model.peft_config["default"].target_modules
        ['resnet.encoder.stages.0']
        >>> trainable = [name for name, p in model.base_model.model.named_parameters() if p.requires_grad]
        >>> sorted({name.split(".layers.")[0] for name in trainable})
        ['resnet.encoder.stages.0']
        >>> next(name for name, p in model.named_parameters() if p.requires_grad)  # PEFT's naming of them
        'base_model.surgical_layers.resnet/encoder/stages/0/layers/0/layer/0/convolution.tuned.default.weight'

    """

    prefix: str = "surgical_"
    tuner_layer_cls = SurgicalLayer
    target_module_mapping: ClassVar[dict[str, list[str]]] = {}  # blocks are resolved from structure instead
    # The base snapshots and stashed deltas live on the tuner, not in the model: PEFT's `inject_adapter_in_model`,
    # which returns the bare model, refuses such tuners with a message that says to use `get_peft_model`.
    uses_shared_state: ClassVar[bool] = True

    def _pre_injection_hook(self, model: nn.Module, config: SurgicalConfig, adapter_name: str) -> None:
        # Called by BaseTuner.__init__ once nn.Module is set up and before the first adapter is injected.
        self.surgical_layers = nn.ModuleDict()  # module path ("." as "/") -> layer, shared by all adapters
        self._modules["model"] = self._modules.pop("model")  # the layers first: their names for tuned parameters
        self._adapter_modules: dict[str, list[str]] = {}  # adapter -> paths of the modules it tunes
        self._adapter_targets: dict[str, list[str]] = {}  # adapter -> the module paths PEFT matched (outermost)
        self._upcasts = Upcasts()  # autocast adapters' targets on a half-precision model (`_cast_adapter_dtype`)
        self._full_precision = FullPrecisionBlocks()  # the tuned blocks' quantized modules, replaced to train
        self._pending_targets: list[str] = []
        self._adapters_enabled = True
        self._base_fingerprint: dict[str, Any] | None = None
        self._requires_grad_before: dict[str, bool] = {}
        self._awaiting_weights: set[str] = set()  # adapters created from a saved config, whose weights are not loaded
        self._training_subset: list[str] | None = None  # see `train_only`

    def _layer(self, path: str) -> SurgicalLayer:
        return self.surgical_layers[to_key(path)]

    # ----------------------------------------------------------------------------------------------------- injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, **kwargs: Any) -> None:
        """Resolve `block` names, check the base fingerprint, then let PEFT match `target_modules` (nothing is changed
        in the model before all checks pass)."""
        config: SurgicalConfig = self.peft_config[adapter_name]
        config.check_weights_present()
        blocks = list_blocks(model)
        current = self._fingerprint(model, blocks, config)
        saved = config.base_fingerprint is not None or config.saved_modules is not None  # weights to come from a file
        if saved and config.verify_base:  # first: another model has other blocks
            self._check_base(config, current)
        self._check_saved_file(model, config)
        self._resolve_blocks(config, blocks)
        self._pending_targets = []
        if not self._requires_grad_before:  # before PEFT's injection, which already switches adapters
            self._requires_grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
        # PEFT's injection calls `set_adapter(active, inference_mode=<the new adapter's>)`, which must not change
        # whether the adapters already there are trainable.
        inference_modes = {name: other.inference_mode for name, other in self.peft_config.items()}
        self._adapter_modules[adapter_name] = []
        try:
            with self._matchable_names_only(model, config):
                tensors = tensor_targets(model, config)
                with self._tensors_only(model, config, tensors):
                    super().inject_adapter(model, adapter_name, **kwargs)
                self._add_layers(model, adapter_name, config, tensors)
        except Exception as error:
            self._restore_inference_modes(inference_modes)  # before `_forget` sets the others' flags again
            self._forget(adapter_name)  # PEFT's injection has already set requires_grad flags: undo everything
            if isinstance(error, NoMatchingPeftModuleError):
                source = f" (the config of {config.loaded_from})" if config.loaded_from is not None else ""
                raise type(error)(f"{error}{source}\nThe model's blocks, for reference:\n{blocks}") from error
            raise
        self._restore_inference_modes(inference_modes)
        owners = self._adapter_modules[adapter_name]
        if saved:
            self._awaiting_weights.add(adapter_name)
        elif not config.init_weights:  # a new adapter (a loaded one gets its saved deltas instead)
            for path in owners:
                self._layer(path).init_random(adapter_name)
        config.base_fingerprint = config.base_fingerprint or current
        self._activate(self.active_adapters)

    def _check_new_adapter_config(self, config: SurgicalConfig) -> None:
        """PEFT's check of a new adapter (already in `peft_config`), for this tuner's `bias` values: an adapter with
        `bias="all"` (which tunes every bias of the model) must be the model's only one."""
        with_bias = [name for name, other in self.peft_config.items() if other.bias == "all"]
        if with_bias and len(self.peft_config) > 1:
            new = next(name for name, other in self.peft_config.items() if other is config)
            others = [name for name in self.peft_config if name != new]
            raise InputError(
                f"Adapter(s) {with_bias} have bias='all', which tunes every bias of the model, so such an adapter "
                f"must be the model's only one; cannot add {new!r} beside {others}. Use bias='surgical_only' (the "
                "tuned modules' biases only), or delete the other adapter first."
            )

    @staticmethod
    def _check_base(config: SurgicalConfig, current: dict[str, Any]) -> None:
        """An `InputError` unless the base fingerprint the adapter records matches the model's (`current`)."""
        if config.base_fingerprint is None:
            raise InputError(
                "This adapter's config records no base_fingerprint (was adapter_config.json edited?), so the base "
                "it was trained on cannot be checked. To load it anyway, pass `verify_base=False`."
            )
        check_fingerprint(config.base_fingerprint, current)

    @contextlib.contextmanager
    def _tensors_only(self, model: nn.Module, config: SurgicalConfig, tensors: list[str]) -> Iterator[None]:
        """Where `config` targets `tensors` (a container's, e.g. `block="stem"` of a timm ViT) and no module, or only
        modules it saves in full (a new head, `block="head"`), PEFT's injection runs as for a dummy adapter (PEFT's own
        convention), which may match nothing."""
        saved = config.modules_to_save or []
        modules = (key for key, _ in model.named_modules() if key and not is_under(key, saved))
        matched = any(self._check_target_module_exists(config, key) for key in modules)
        if matched or not (tensors or targets_saved_in_full(config)):
            yield
            return
        target_modules, config.target_modules = config.target_modules, DUMMY_TARGET_MODULES
        try:
            yield
        finally:
            config.target_modules = target_modules

    @contextlib.contextmanager
    def _matchable_names_only(self, model: nn.Module, config: SurgicalConfig) -> Iterator[None]:
        """While PEFT matches a long list `target_modules` or `exclude_modules` (over `_LONG_LIST` names), they hold
        only the names that can match something of `model`; the config holds the full lists again afterwards.

        PEFT tries every name against every module, and condenses a long list with a search quadratic in its length:
        10,000 names took 8.6 s, 1,000,000 hung. A name matches a path (a module's, or a container's tensor's) that it
        equals or ends as after a dot, PEFT's rule, so a name that is no such ending of any path of `model` matches
        nothing."""
        lists = {name: getattr(config, name) for name in ("target_modules", "exclude_modules")}
        long = {name: names for name, names in lists.items() if isinstance(names, list) and len(names) > _LONG_LIST}
        if not long:
            yield
            return
        paths = [key for key, _ in model.named_modules() if key] + list(model.state_dict(keep_vars=True))
        split = (path.split(".") for path in paths)
        endings = {".".join(parts[start:]) for parts in split for start in range(len(parts))}
        kept = {name: [entry for entry in names if entry in endings] for name, names in long.items()}
        if kept.get("target_modules") == []:
            raise NoMatchingPeftModuleError(
                f"Target modules {few(long['target_modules'])} not found in the base model. Please check the target "
                "modules and try again."
            )
        if kept.get("exclude_modules") == []:  # PEFT's warning, which would list every name
            warnings.warn(
                f"You have passed exclude_modules={few(long['exclude_modules'])} but no modules were excluded. Please "
                "check that exclude_modules was set correctly.",
                stacklevel=4,
            )
            kept["exclude_modules"] = None
        for name, names in kept.items():
            setattr(config, name, names)
        try:
            yield
        finally:
            for name, names in long.items():
                setattr(config, name, names)

    def _add_layers(self, model: nn.Module, adapter_name: str, config: SurgicalConfig, tensors: list[str]) -> None:
        """Give every module with tensors under the targets PEFT matched a layer, and every targeted tensor of a
        container (`tensors`) one of its own, and record them as the adapter's."""
        pending = self._pending_targets  # PEFT reports nested matches too; the outermost ones cover the rest
        if config.blocks:  # exact module paths: PEFT's suffix match of `conv1` would also take `layer1.0.conv1`
            pending = [path for path in pending if path in config.target_modules]
        targets = [path for path in pending if not is_under(path, [other for other in pending if other != path])]
        self._adapter_targets[adapter_name] = targets
        self._full_precision.replace(model, targets)
        owners = self._adapter_modules[adapter_name]
        for target in targets:
            for name, module in model.get_submodule(target).named_modules(prefix=target):
                if is_under(name, config.modules_to_save or []) or next(owned_tensors(module), None) is None:
                    continue
                if not owns_loose_tensors(module):
                    owners.append(self._add_layer(adapter_name, name, module, name))
                    continue
                for tensor_name, _ in owned_tensors(module):  # a container's tensors are targets of their own
                    tensor_path = join(name, tensor_name)
                    owners.append(self._add_layer(adapter_name, tensor_path, module, name, (tensor_name,)))
        self._add_tensor_layers(adapter_name, [path for path in tensors if not is_under(path, targets)])
        if not owners and not targets_saved_in_full(config):
            raise InputError(f"The modules matched by target_modules={config.target_modules} hold no tensors to tune.")

    def _add_tensor_layers(self, adapter_name: str, tensor_paths: list[str]) -> None:
        """Make `adapter_name` tune each tensor of `tensor_paths` by itself (a layer keyed by its tensor path)."""
        for tensor_path in tensor_paths:
            owner, _, tensor_name = tensor_path.rpartition(".")
            module = self.model.get_submodule(owner)
            self._adapter_modules[adapter_name].append(
                self._add_layer(adapter_name, tensor_path, module, owner, (tensor_name,))
            )

    def _add_layer(
        self, adapter_name: str, path: str, module: nn.Module, owner: str, names: tuple[str, ...] | None = None
    ) -> str:
        """Make `adapter_name` tune the layer at `path` (a module path, or a tensor path where `names` names one
        tensor of the container `module` at `owner`), creating the layer if no adapter tunes it yet; returns `path`."""
        key = to_key(path)
        if key not in self.surgical_layers:
            self.surgical_layers[key] = SurgicalLayer(module, owner, names)
        self.surgical_layers[key].add_adapter(adapter_name)
        return path

    def _restore_inference_modes(self, modes: dict[str, bool]) -> None:
        for name, mode in modes.items():
            if name in self.peft_config:
                self.peft_config[name].inference_mode = mode

    def _resolve_blocks(self, config: SurgicalConfig, blocks: BlockMap) -> None:
        if not config.blocks and config.target_modules is None:
            raise InputError(f"SurgicalConfig needs `block` or `target_modules`. {self._choices(blocks)}")
        if not config.blocks:
            return
        if config.blocks == [AUTO]:
            raise InputError(
                "block='auto' must be resolved on target data before the adapter is created: "
                "config = surgical_peft.select_blocks(model, dataloader, config), then get_peft_model(model, config)."
            )
        if not blocks.structural:
            raise InputError(
                f"{blocks.model_name} has no block map, so block {few(config.blocks)} cannot be resolved. Pass "
                f"`target_modules` instead (module names or a regex). {self._choices(blocks)}"
            )
        names = list(blocks) if config.blocks == [ALL] else config.blocks
        resolved = blocks.target_modules(names)
        recorded = config.target_modules
        if recorded is not None and recorded != resolved:
            shown = few(recorded if isinstance(recorded, list) else [recorded])
            raise InputError(
                f"block {few(config.blocks)} resolves to {resolved} on this {blocks.model_name}, but the config "
                f"records target_modules {shown}; pass only one of them."
            )
        config.target_modules = resolved

    @staticmethod
    def _choices(blocks: BlockMap) -> str:
        return f"The model's blocks (surgical_peft.list_blocks(model)):\n{blocks}"

    def _fingerprint(self, model: nn.Module, blocks: BlockMap, config: SurgicalConfig) -> dict[str, Any]:
        """Fingerprint of the base weights (snapshots where an adapter is loaded), skipping `modules_to_save`."""
        if self._base_fingerprint is not None and not config.modules_to_save:
            return self._base_fingerprint
        block_tensors: dict[str, dict[str, torch.Tensor]] = {block: {} for block in blocks}
        for path, tensor in self._base_tensors(model).items():
            block = blocks.block_of(path)
            if block is not None and not is_under(path, config.modules_to_save or []):
                block_tensors[block][path] = tensor
        result = fingerprint(blocks.model_name, block_tensors)
        if not config.modules_to_save:
            self._base_fingerprint = result
        return result

    def _base_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor of the base model by its path, as before any adapter: the snapshots where a layer keeps one,
        the original module of a `modules_to_save` wrapper (under the wrapper's path; its copies are left out)."""
        wrappers = [f"{name}." for name, _ in self._auxiliary_modules()]
        base = {}
        for path, tensor in self._full_precision.as_loaded(model.state_dict(keep_vars=True)).items():
            wrapper = next((prefix for prefix in wrappers if path.startswith(prefix)), None)
            if wrapper is not None:  # a modules_to_save wrapper: the original module is the base, not the copies
                if not path.startswith(f"{wrapper}original_module."):
                    continue
                path = wrapper + path.removeprefix(f"{wrapper}original_module.")
            base[path] = tensor if self._full_precision.holds(path) else self._base_tensor(path, tensor)
        return base

    def _check_saved_file(self, model: nn.Module, config: SurgicalConfig) -> None:
        """For an adapter read from a directory, check its weights file against `model` before anything changes: what
        its header announces first (each tensor one of the model's, with its shape and dtype: nothing is read yet, so
        a header announcing 8 GB is refused at no cost), then its data (now at most the model's size)."""
        weights = weights_file(config.loaded_from) if config.loaded_from is not None else None
        if weights is None:
            return
        expected = {KEY_PREFIX + path: full_precision_like(t) for path, t in self._base_tensors(model).items()}
        heads = config.modules_to_save or []
        check_announced(weights, expected, config.delta_torch_dtype, heads, label_names(model))
        check_weights_data(weights)

    def _base_tensor(self, path: str, live: torch.Tensor) -> torch.Tensor:
        """The base snapshot of the tensor at `path` where a layer keeps one, else `live` (the tensor itself)."""
        module_path, _, name = path.rpartition(".")
        for key in (to_key(path), to_key(module_path)):  # a container's tensor has a layer of its own
            if key in self.surgical_layers and name in self.surgical_layers[key].base:
                return self.surgical_layers[key].base[name]
        return live

    def _create_and_replace(
        self,
        peft_config: SurgicalConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        # Nothing is replaced: the matched module is tuned in place. Layers are created once all matches are known.
        self._pending_targets.append(current_key)

    def _check_target_module_exists(self, peft_config: SurgicalConfig, key: str) -> bool | re.Match[str] | None:
        # A saved adapter's regex is never run: its weights file names the modules it tunes, and a regex from a file
        # could take forever (catastrophic backtracking, e.g. "(.+)+Z") on every module name of a large model.
        patterns = (peft_config.target_modules, peft_config.exclude_modules)
        if peft_config.saved_modules is not None and any(isinstance(pattern, str) for pattern in patterns):
            # A module matches where the file holds all its tensors; a container's own tensors, and with bias="all"
            # a bias alone, are targets by themselves (`targets.tensor_targets`).
            module = self.model.get_submodule(key)
            saved = set(peft_config.saved_tensors or [])
            return (
                key in peft_config.saved_modules
                and not owns_loose_tensors(module)
                and all(join(key, name) in saved for name, _ in owned_tensors(module))
            )
        return super()._check_target_module_exists(peft_config, key)

    def _prepare_adapter_config(self, peft_config: SurgicalConfig, model_config: dict) -> SurgicalConfig:
        return peft_config

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """PEFT's `autocast_adapter_dtype` (its default): on a float16/bfloat16 model, the adapter's target modules
        run in float32 while it is loaded (`precision.Upcasts`); a float32 model is left as it is."""
        if autocast_adapter_dtype and adapter_name in self._adapter_targets:
            self._upcasts.add(self.model, self._adapter_targets[adapter_name], adapter_name)
            self._activate(self.active_adapters)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # Trainability is set by `_activate`, which knows the active adapter's modules.
        return

    # ------------------------------------------------------------------------------------------- adapter switching
    def _activate(self, adapter_names: list[str]) -> None:
        """Load the weights of `adapter_names` (the base weights when adapters are disabled) and set requires_grad.

        A module tuned by one of them holds that adapter's weights and trains (unless its config is in inference
        mode); a module tuned by several holds the base plus the sum of their deltas and stays frozen."""
        loaded = list(adapter_names) if self._adapters_enabled else []
        owners = self._owners(loaded)
        self._upcasts.apply(loaded, only_up=True)  # float32 first, so that weights are stashed and written in it
        for key, layer in self.surgical_layers.items():
            layer.load(*owners.get(from_key(key), ()))
            layer.set_status(adapter_names, self._adapters_enabled)
            if tuple(layer.merged_adapters) != layer.loaded:  # switched away: the merge is over
                layer.merged_adapters = []
        self._upcasts.apply(loaded)
        training = self._training_modules(loaded)
        trainable = {path for path, name in training.items() if not self.peft_config[name].inference_mode}
        auxiliary = [name for name, _ in self._auxiliary_modules()]
        for path, parameter in self.model.named_parameters():
            module_path = path.rpartition(".")[0]
            if not is_under(module_path, auxiliary):  # PEFT's modules_to_save wrappers manage their own parameters
                parameter.requires_grad_(module_path in trainable or path in trainable)  # (a container's tensor)
        self._set_norm_modes(list(training))

    def _owners(self, adapter_names: list[str]) -> dict[str, tuple[str, ...]]:
        """Module path -> the adapters among `adapter_names` that tune it, in their order."""
        owners: dict[str, tuple[str, ...]] = {}
        for name in adapter_names:
            for path in self._adapter_modules.get(name, []):
                owners[path] = (*owners.get(path, ()), name)
        return owners

    def _shared_modules(self) -> dict[str, tuple[str, ...]]:
        """The modules that several of the loaded adapters tune (they hold a sum, for inference only)."""
        return {path: names for path, names in self._owners(self._loaded_adapters).items() if len(names) > 1}

    def _shared_message(self) -> str | None:
        """What to say (naming the adapters and blocks) when loaded adapters share modules; `None` if they do not."""
        shared = self._shared_modules()
        if not shared:
            return None
        adapters = sorted({name for names in shared.values() for name in names})
        blocks = list_blocks(self.model)
        where = sorted({blocks.block_of(path) or path for path in shared})
        return (
            f"Adapters {adapters} are active together and tune the same block(s) {where} (modules "
            f"{', '.join(list(shared)[:3])}{', ...' if len(shared) > 3 else ''}): there the model holds the sum of "
            "their deltas, for inference only, so those modules stay frozen and training them (model.train()) is "
            f"refused. Train one adapter at a time (set_adapter({adapters[0]!r})), or activate together only adapters "
            "on disjoint blocks."
        )

    def train_only(self, module_paths: list[str] | None) -> None:
        """Train only the active adapters' modules under `module_paths` (`None`: all of them), e.g. the head alone in
        the linear-probe phase of LP-FT. The others keep their weights and run as frozen modules (BatchNorm in eval
        mode); `modules_to_save` always train.

        Example:
            >>> from peft import get_peft_model
            >>> from transformers import ResNetConfig, ResNetForImageClassification
            >>> from surgical_peft import SurgicalConfig
            >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
            >>> model = get_peft_model(base, SurgicalConfig(block=["stage1", "head"]))
            >>> model.base_model.train_only(["classifier"])
            >>> trainable = [name for name, p in model.base_model.model.named_parameters() if p.requires_grad]
            >>> sorted({name.split(".")[0] for name in trainable})
            ['classifier']
        """
        self._training_subset = None if module_paths is None else list(module_paths)
        self._activate(self.active_adapters)

    def _training_modules(self, adapter_names: list[str]) -> dict[str, str]:
        """Module path -> the adapter that trains it: the modules that exactly one of `adapter_names` tunes (a module
        several tune holds their sum and stays frozen), all of them unless `train_only` restricts them."""
        return {
            path: names[0]
            for path, names in self._owners(adapter_names).items()
            if len(names) == 1 and (self._training_subset is None or is_under(path, self._training_subset))
        }

    @property
    def _loaded_adapters(self) -> list[str]:
        """The adapters whose weights the model holds (none when adapters are disabled)."""
        return list(self.active_adapters) if self._adapters_enabled else []

    def _set_norm_modes(self, tuned_modules: list[str]) -> None:
        """Frozen norms with running statistics run in eval mode; the tuned ones follow the model's mode."""
        for path, module in self.model.named_modules():
            if isinstance(module, NORMS_WITH_RUNNING_STATS):
                module.train(self.model.training and is_under(path, tuned_modules))

    def train(self, mode: bool = True) -> SurgicalModel:
        """`nn.Module.train`, except that frozen BatchNorm layers stay in eval mode (their statistics never drift).

        Refused (an `InputError`, before anything changes here) while active adapters tune the same block: their sum
        is for inference only (`model.eval()` and `torch.no_grad()`)."""
        if mode and (shared := self._shared_message()):
            raise InputError(shared)
        super().train(mode)
        self._set_norm_modes(list(self._training_modules(self._loaded_adapters)))
        return self

    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any) -> Iterator[None]:
        """PEFT enters this around every forward pass of an enabled adapter: there gradient checkpointing is made to
        spare the frozen prefix (`checkpointing.compose`), once PEFT's `get_peft_model` has set it up, and PEFT's
        `adapter_names` (one adapter per example) are served (`surgical_peft.serving.mixed`, which imports PEFT: it is
        imported here, once the tuner is)."""
        from ..serving.mixed import mixed_batch

        compose(self.model)
        with mixed_batch(self, kwargs):
            yield

    def adapter_targets(self, adapter_name: str) -> list[str]:
        """The paths of the modules `adapter_name` tunes as a whole: the outermost ones its `target_modules` matched
        (its blocks), without the tensors a container owns that it tunes by themselves.

        Example:
            >>> from peft import get_peft_model
            >>> from transformers import ResNetConfig, ResNetForImageClassification
            >>> from surgical_peft import SurgicalConfig
            >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8], depths=[1]))
            >>> get_peft_model(base, SurgicalConfig(block=["stage1", "head"])).base_model.adapter_targets("default")
            ['resnet.encoder.stages.0', 'classifier']
        """
        return list(self._adapter_targets.get(adapter_name, []))

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter(s): their weights go into the model, the others' to the CPU.

        Several adapters can be active together (`model.base_model.set_adapter(["a", "b"])`, as in PEFT): on disjoint
        blocks each trains and infers as if alone; on a block that several tune, the model holds the base plus the sum
        of their deltas, for inference only: those modules stay frozen, and `model.train()` is refused.

        Example:
            >>> from peft import get_peft_model
            >>> from transformers import ResNetConfig, ResNetForImageClassification
            >>> from surgical_peft import SurgicalConfig
            >>> config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
            >>> base = ResNetForImageClassification(config)
            >>> model = get_peft_model(base, SurgicalConfig(block="stage1"), adapter_name="one")
            >>> model.add_adapter("two", SurgicalConfig(block="stage2"))
            >>> model.base_model.set_adapter(["one", "two"])
            >>> model.active_adapters
            ['one', 'two']
            >>> trainable = [name for name, p in model.base_model.model.named_parameters() if p.requires_grad]
            >>> sorted({name.split(".layers.")[0] for name in trainable})
            ['resnet.encoder.stages.0', 'resnet.encoder.stages.1']
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        unknown = [name for name in names if name not in self.peft_config]
        if unknown or len(set(names)) < len(names):
            problem = f"Adapter(s) {unknown} not found" if unknown else f"Adapter names repeat in {names}"
            raise InputError(f"{problem}. Available: {list(self.peft_config)}.")
        for _, module in self._auxiliary_modules():  # PEFT's own check (one modules_to_save copy each), first
            module.check_set_adapter(names)
        switched = names != self.active_adapters  # PEFT's injection sets the same adapters again
        for name in names:
            self.peft_config[name].inference_mode = inference_mode
        self.active_adapter = adapter_name
        self._activate(names)
        if switched and self.model.training and (shared := self._shared_message()):
            warnings.warn(shared, stacklevel=2)
        set_auxiliary_adapter(self.model, names, inference_mode=inference_mode)  # PEFT's modules_to_save wrappers

    def _auxiliary_modules(self) -> list[tuple[str, AuxiliaryTrainingWrapper]]:
        """PEFT's wrappers of `modules_to_save`, which switch, train and unload by themselves."""
        return [(n, m) for n, m in self.model.named_modules() if isinstance(m, AuxiliaryTrainingWrapper)]

    def disable_adapter_layers(self) -> None:
        """Disable all adapters: the model computes exactly as the base (PEFT warns here for LoRA's `bias`, whose
        trained biases stay; the tuned biases here, with `bias="all"` too, go back to the base like the rest)."""
        self._enable_adapter_layers(enabled=False)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        self._adapters_enabled = enabled
        self._activate(self.active_adapters)
        for _, module in self._auxiliary_modules():
            module.enable_adapters(enabled)

    def set_requires_grad(self, adapter_names: str | list[str], requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        shared = self._shared_modules().values()
        if requires_grad and any(name in owners for owners in shared for name in names):
            raise InputError(self._shared_message())
        for name in names:
            self.peft_config[name].inference_mode = not requires_grad
        self._activate(self.active_adapters)
        for _, module in self._auxiliary_modules():
            module.set_requires_grad(names, requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete `adapter_name`; if it was active, the first remaining adapter becomes active."""
        if adapter_name not in self.peft_config:
            raise InputError(f"Adapter {adapter_name!r} does not exist. Available: {list(self.peft_config)}.")
        if any(adapter_name in layer.merged_adapters for layer in self.surgical_layers.values()):  # PEFT's message
            raise InputError(
                f"Cannot delete adapter(s) {[adapter_name]} while they are merged. Please unmerge them first."
            )
        del self.peft_config[adapter_name]
        self._awaiting_weights.discard(adapter_name)
        self._adapter_targets.pop(adapter_name, None)
        self._upcasts.remove(adapter_name)
        for path in self._adapter_modules.pop(adapter_name):
            layer = self._layer(path)
            layer.delete_adapter(adapter_name)
            if not layer.adapters:
                del self.surgical_layers[to_key(path)]
        self._full_precision.restore(
            self.model, keep=[path for paths in self._adapter_targets.values() for path in paths]
        )
        remaining = [name for name in self.active_adapters if name != adapter_name]
        self.active_adapter = remaining or list(self.peft_config)[:1]
        self._activate(self.active_adapters)
        delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=self.active_adapters)

    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Add `adapter_name`, whose deltas are the weighted sum of the deltas of `adapters` (PEFT's linear
        combination) on every module they tune. It is an adapter like any other: inactive until `set_adapter`, then
        trainable, saved and loaded on its own.

        Example:
            >>> import torch
            >>> from peft import get_peft_model
            >>> from surgical_peft import SurgicalConfig
            >>> base = torch.nn.Sequential(torch.nn.Linear(2, 2))
            >>> model = get_peft_model(base, SurgicalConfig(target_modules=["0"]))
            >>> model.add_adapter("other", SurgicalConfig(target_modules=["0"], init_weights=False))
            >>> model.add_weighted_adapter(["default", "other"], [1.0, -1.0], "mix")
            >>> layer = model.base_model.surgical_layers["0"]
            >>> bool(torch.allclose(layer.delta("mix")["weight"], -layer.delta("other")["weight"]))  # (up to rounding)
            True
        """
        self._check_weighted(adapters, weights, adapter_name)
        first = self.peft_config[adapters[0]]
        modules = sorted({path for name in adapters for path in self._adapter_modules[name]})
        self.peft_config[adapter_name] = SurgicalConfig(
            target_modules="|".join(map(re.escape, modules)),  # exactly these (a name list also matches suffixes)
            delta_dtype=first.delta_dtype,
            base_model_name_or_path=first.base_model_name_or_path,
            task_type=first.task_type,
        )
        self.inject_adapter(self.model, adapter_name)
        weighted = list(zip(adapters, weights, strict=True))
        for path in modules:
            layer = self._layer(path)
            terms = [(w, layer.delta(name)) for name, w in weighted if name in layer.adapters]
            layer.set_delta(adapter_name, {key: sum(w * delta[key] for w, delta in terms) for key in layer.base})

    def _check_weighted(self, adapters: list[str], weights: list[float], adapter_name: str) -> None:
        """Raise an `InputError` unless `add_weighted_adapter(adapters, weights, adapter_name)` can be done."""
        available = list(self.peft_config)
        unknown = [name for name in adapters if name not in self.peft_config]
        if unknown or not adapters:
            raise InputError(f"Adapter(s) {unknown or adapters} cannot be combined. Available: {available}.")
        if len(weights) != len(adapters):
            raise InputError(f"{len(weights)} weights given for {len(adapters)} adapters {adapters}: one each.")
        if adapter_name in self.peft_config:
            raise InputError(f"Adapter {adapter_name!r} already exists (adapters: {available}); choose a new name.")
        full = [name for name in adapters if self.peft_config[name].modules_to_save]
        if full:
            raise InputError(f"Adapters {full} have modules_to_save, which are full copies, not deltas: no sum.")

    # ------------------------------------------------------------------------------------- merging and unloading
    def merge_adapter(self, adapter_names: list[str] | None = None, safe_merge: bool = False) -> None:
        """The active adapters' weights (a sum where several tune a module) are always in the model, so merging only
        switches to `adapter_names`; `safe_merge` checks that they are finite. As in PEFT, the layers then report the
        adapters as merged (until `unmerge_adapter` or a switch), merging again warns, and a merged adapter cannot be
        deleted."""
        if adapter_names:  # switch without changing whether the adapter trains
            modes = {self.peft_config[name].inference_mode for name in adapter_names if name in self.peft_config}
            self.set_adapter(adapter_names, inference_mode=modes == {True})
        if safe_merge:
            self._check_finite()
        layers = [layer for layer in self.surgical_layers.values() if layer.loaded]
        if layers and all(tuple(layer.merged_adapters) == layer.loaded for layer in layers):
            warnings.warn("All adapters are already merged, nothing to do.", stacklevel=2)
        for layer in layers:
            layer.merged_adapters = list(layer.loaded)

    def _check_finite(self) -> None:
        """Raise a `ValueError` if the weights of the modules the active adapters tune hold NaN or inf."""
        owners = self._owners(self._loaded_adapters)
        broken = {
            self._layer(path).tensor_paths[name]: path
            for path in owners
            for name, tensor in self._layer(path).tensors().items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()
        }
        if broken:
            adapters = sorted({name for path in broken.values() for name in owners[path]})
            named = ", ".join(map(repr, adapters))
            raise InputError(f"NaNs detected in the weights of adapter {named} ({', '.join(list(broken)[:3])}).")

    def unmerge_adapter(self) -> None:
        """Nothing to undo in the weights (merging never changes more than which adapter is active); the layers stop
        reporting the adapter as merged."""
        for layer in self.surgical_layers.values():
            layer.merged_adapters = []

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: list[str] | None = None,
    ) -> nn.Module:
        if merge:
            self.merge_adapter(adapter_names, safe_merge=safe_merge)
        else:
            for layer in self.surgical_layers.values():
                layer.load()
        for path, module in self._auxiliary_modules():
            parent, _, name = path.rpartition(".")
            unwrapped = (
                module.unload_and_optionally_merge_module(merge=True, safe_merge=safe_merge, adapter_names=None)
                if merge
                else module.original_module
            )
            setattr(self.model.get_submodule(parent), name, unwrapped)
        if merge:  # the tuned weights stay in full precision
            self._full_precision.forget()
        else:
            self._full_precision.restore(self.model)
        for name in list(self._adapter_targets):
            self._upcasts.remove(name)
        self._upcasts.apply([])  # (merged weights rounded to the model's dtype, as PEFT merges)
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad_before.get(name, parameter.requires_grad))
        for module in self.model.modules():  # no norm is held in eval mode any more
            if isinstance(module, NORMS_WITH_RUNNING_STATS):
                module.train(self.model.training)
        self.surgical_layers.clear()
        self._adapter_modules.clear()
        self._adapter_targets.clear()
        self._requires_grad_before = {}
        self._awaiting_weights.clear()
        self._base_fingerprint = None
        if hasattr(self.model, "peft_config"):
            del self.model.peft_config
        return self.model

    # ----------------------------------------------------------------------------------------- (de)serialisation
    @staticmethod
    def _tuner_of(model: nn.Module) -> SurgicalModel:
        tuner = getattr(model, "base_model", None)
        if not isinstance(tuner, SurgicalModel):
            raise TypeError("Surgical adapters are saved and loaded through a PeftModel (peft.get_peft_model).")
        return tuner

    def _adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The base snapshots of the tensors an adapter applies to, keyed as in the adapter file."""
        layers = [self._layer(path) for path in self._adapter_modules[adapter_name]]
        return {layer.file_keys[name]: base for layer in layers for name, base in layer.base.items()}

    @classmethod
    def _get_adapter_state_dict(
        cls,
        model: nn.Module,
        config: SurgicalConfig,
        adapter_name: str,
        state_dict: dict[str, torch.Tensor],
        unwanted_adapter_names: list[str],
    ) -> dict[str, torch.Tensor]:
        """The deltas of `adapter_name` (tuned - base), parameters in `config.delta_dtype`. Buffers (BatchNorm running
        statistics) keep their dtype: they are tiny, and a shift can move a running variance by orders of magnitude,
        which bf16 deltas round badly (measured in benchmarks/shifts.py). With deltas in the weights' own dtype, the
        model is then rounded to exactly what loading them gives (`SurgicalLayer.hold_saved`), so that a checkpoint
        resumes bit-identically."""
        tuner = cls._tuner_of(model)
        deltas, parameters, lives = {}, set(), {}
        for path in tuner._adapter_modules[adapter_name]:
            layer = tuner._layer(path)
            keys = layer.file_keys
            # Under FSDP or DeepSpeed the gathered `state_dict` holds the full tensors; the module may hold shards.
            live = {name: state_dict[key] for name, key in keys.items() if key in state_dict}
            lives[path] = live
            for name, delta in layer.delta(adapter_name, live).items():
                deltas[keys[name]] = delta
                if name in layer.module._parameters and delta.is_floating_point():
                    parameters.add(keys[name])
        check_finite(deltas, f"Adapter {adapter_name!r} was not saved: its weights")
        dtype = config.delta_torch_dtype
        result = {
            key: delta.to(dtype if dtype is not None and key in parameters else delta.dtype).contiguous()
            for key, delta in deltas.items()
        }
        overflowed = sorted(key for key in parameters if not bool(torch.isfinite(result[key]).all()))
        if overflowed:
            raise InputError(
                f"Adapter {adapter_name!r} was not saved: its deltas overflow delta_dtype={config.delta_dtype!r} in "
                f"{', '.join(overflowed[:3])}. Use delta_dtype='bfloat16' (float32's range) or None."
            )
        for path, live in lives.items():
            layer = tuner._layer(path)
            layer.hold_saved(adapter_name, layer.keyed(result), live)
        return result

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key  # adapter names never appear in the keys

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: SurgicalConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Check the deltas against the model and apply them; a bad file leaves the model as it was (an adapter added
        for it is removed again).

        Returns the full weights of `modules_to_save`, which PEFT loads into its wrappers itself.
        """
        tuner = cls._tuner_of(model)
        auxiliary = tuple(f"{KEY_PREFIX}{name}." for name, _ in tuner._auxiliary_modules())
        full = {key: tensor for key, tensor in state_dict.items() if auxiliary and key.startswith(auxiliary)}
        deltas = {key: tensor for key, tensor in state_dict.items() if key not in full}
        biases = tuner._biases_to_adopt(adapter_name, config, deltas)
        expected = {
            **tuner._adapter_tensors(adapter_name),
            **{KEY_PREFIX + p: tuner.model.get_parameter(p) for p in biases},
        }
        try:
            check_delta_state_dict(deltas, expected, config.delta_torch_dtype)
            check_finite(state_dict, "The adapter")
            tuner._check_running_variances(adapter_name, deltas)
        except ValueError:
            if adapter_name in tuner._awaiting_weights:
                tuner._forget(adapter_name)
            raise
        tuner._awaiting_weights.discard(adapter_name)
        if biases:  # all checks passed: the adapter takes them on
            config.bias = "all"
            tuner._add_tensor_layers(adapter_name, biases)
            tuner._activate(tuner.active_adapters)
        for path in tuner._adapter_modules[adapter_name]:
            layer = tuner._layer(path)
            layer.set_delta(adapter_name, layer.keyed(deltas))
        return full

    def _biases_to_adopt(
        self, adapter_name: str, config: SurgicalConfig, deltas: Mapping[str, torch.Tensor]
    ) -> list[str]:
        """A state dict saved with `bias="all"` loads into an adapter created without it, as PEFT loads one into a
        LoRA adapter (`set_peft_model_state_dict`): where the deltas beyond the adapter's own tensors are exactly the
        model's other biases, and it is the model's only adapter, it takes them on (its config then says so). Returns
        those biases' paths (none otherwise: extra deltas are then refused by the key check)."""
        extra = set(deltas) - set(self._adapter_tensors(adapter_name))
        if config.bias == "all" or not extra or len(self.peft_config) > 1:
            return []
        biases = bias_targets(self.model, config.modules_to_save)
        others = [path for path in biases if not is_under(path, self._adapter_targets.get(adapter_name, []))]
        return others if {KEY_PREFIX + path for path in others} == extra else []

    def _check_running_variances(self, adapter_name: str, deltas: Mapping[str, torch.Tensor]) -> None:
        """Raise an `InputError` if `deltas` would give a running variance (BatchNorm) a negative value."""
        negative = []
        for path in self._adapter_modules[adapter_name]:
            layer = self._layer(path)
            if "running_var" not in layer.base:
                continue
            key = layer.file_keys["running_var"]
            if bool((layer.base["running_var"] + deltas[key] < 0).any()):
                negative.append(key)
        if negative:
            raise InputError(f"The adapter gives a negative running variance to {', '.join(negative[:3])}.")

    def _forget(self, adapter_name: str) -> None:
        """Remove an adapter that could not be added or loaded, leaving the model as it was before it was added."""
        if len(self.peft_config) == 1:
            self._adapter_modules.pop(adapter_name, None)
            self._unload_and_optionally_merge(merge=False)
            self.peft_config.pop(adapter_name, None)
        else:
            self.delete_adapter(adapter_name)
