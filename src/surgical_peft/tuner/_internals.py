"""Every private (or undocumented) PEFT, transformers and PyTorch internal the tuner relies on, in one place.

PEFT's tuner API below 1.0 changes between minor releases (hence `peft>=0.21,<0.22` in `pyproject.toml`): on an
upgrade, this module is what to audit. Each name says what the tuner uses it for. One more is a name the tuner
defines rather than uses: `SurgicalModel._enable_peft_forward_hooks`, which PEFT's `PeftModel.forward` enters.

Example:
    >>> from torch import nn
    >>> from surgical_peft.tuner._internals import NORMS_WITH_RUNNING_STATS, persistent_buffer_names
    >>> isinstance(nn.BatchNorm2d(3), NORMS_WITH_RUNNING_STATS), sorted(persistent_buffer_names(nn.BatchNorm2d(3)))
    (True, ['num_batches_tracked', 'running_mean', 'running_var'])
"""

from __future__ import annotations

import functools
import inspect
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import peft
import torch
from aenum import extend_enum
from peft import PeftModel, get_peft_model
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.tuners.lora import conversion as lora_conversion
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _delete_auxiliary_adapter, _get_in_out_features
from peft.utils import PeftType, register_peft_method
from peft.utils.constants import DUMMY_TARGET_MODULES  # a dummy adapter's target_modules: PEFT lets it match none
from peft.utils.error import NoMatchingPeftModuleError

# A quantized module's weight in full precision, as PEFT's LoRA merges into quantized layers:
# `dequantize_module_weight(module)` (bitsandbytes, torchao, HQQ; other weights as they are),
# `get_bnb_param_type(weight)` ("8bit", "4bit" or False) and `dequantize_bnb_weight(weight, state)`.
from peft.utils.integrations import dequantize_bnb_weight, dequantize_module_weight, get_bnb_param_type
from peft.utils.other import AuxiliaryTrainingWrapper, _set_adapter
from torch import nn

__all__ = [
    "DUMMY_TARGET_MODULES",
    "NORMS_WITH_RUNNING_STATS",
    "AuxiliaryTrainingWrapper",
    "BaseTuner",
    "BaseTunerLayer",
    "NoMatchingPeftModuleError",
    "add_peft_type",
    "checkpoints_non_reentrant",
    "delete_auxiliary_adapter",
    "dequantize_bnb_weight",
    "dequantize_module_weight",
    "energy_rank",
    "get_bnb_param_type",
    "holds_input_require_grads",
    "in_out_features",
    "persistent_buffer_names",
    "quiet_get_peft_model",
    "read_adapter_lookups_eagerly",
    "register_method",
    "route_config_reads",
    "route_lora_conversion",
    "route_model_cards",
    "set_auxiliary_adapter",
]

NORMS_WITH_RUNNING_STATS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
"""Normalisation layers whose running statistics move in train mode (BatchNorm, InstanceNorm with stats)."""

delete_auxiliary_adapter = _delete_auxiliary_adapter
"""Deletes an adapter from PEFT's `modules_to_save` wrappers (`peft.tuners.tuners_utils`)."""

set_auxiliary_adapter = _set_adapter
"""Switches PEFT's `modules_to_save` wrappers to other adapters (`peft.utils.other`)."""

energy_rank = lora_conversion._find_cutoff_index
"""`energy_rank(singular_values, threshold)`: the smallest rank whose singular values hold `threshold` of the squared
sum, as PEFT's `convert_to_lora` reads a float rank (`peft.tuners.lora.conversion`)."""


def in_out_features(module: nn.Module) -> tuple[int | None, int | None]:
    """The input and output sizes PEFT's tuner layers expose for `module` (`peft.tuners.tuners_utils`), e.g. a Conv2d's
    channels or an Embedding's vocabulary and width; `(None, None)` for modules without them (LayerNorm, BatchNorm)."""
    try:
        with warnings.catch_warnings():  # it warns "Unsupported layer type" for modules without sizes
            warnings.simplefilter("ignore", UserWarning)
            return _get_in_out_features(module)
    except ValueError:  # a MultiheadAttention with different query, key and value sizes
        return None, None


def persistent_buffer_names(module: nn.Module) -> Iterator[str]:
    """Names of the buffers `module` holds directly and saves in its `state_dict`."""
    for name, _ in module.named_buffers(recurse=False):
        if name not in module._non_persistent_buffers_set:
            yield name


def holds_input_require_grads(model: nn.Module) -> bool:
    """Whether transformers' `enable_input_require_grads` hooks are on `model` (its private `_require_grads_hooks`,
    which `disable_input_require_grads` removes)."""
    return bool(getattr(model, "_require_grads_hooks", None))


def checkpoints_non_reentrant(layer: nn.Module) -> bool:
    """Whether `layer`, a transformers layer with checkpointing enabled, checkpoints with `use_reentrant=False`: its
    private `_gradient_checkpointing_func` is `functools.partial(checkpoint, **gradient_checkpointing_kwargs)`, and
    `torch.utils.checkpoint` is reentrant unless told otherwise."""
    function = getattr(layer, "_gradient_checkpointing_func", None)
    return isinstance(function, functools.partial) and function.keywords.get("use_reentrant") is False


def add_peft_type(name: str) -> PeftType:
    """Add `name` to PEFT's closed `PeftType` enum (its registry takes only members), once."""
    if name not in PeftType.__members__:
        extend_enum(PeftType, name, name)
    return PeftType[name]


def register_method(peft_type: PeftType, config_cls: type, model_cls: type) -> None:
    """Register a tuner with PEFT (`get_peft_model`, `PeftModel.from_pretrained`), once."""
    if peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name=peft_type.value.lower(), config_cls=config_cls, model_cls=model_cls)


def route_config_reads(reader: Callable[[type, str | os.PathLike], dict[str, Any] | None]) -> None:
    """Let `reader(cls, path)` read adapter configs before PEFT's `PeftConfig.from_json_file` does, once.

    That method is the first code `PeftModel.from_pretrained`, `AutoPeftModel*.from_pretrained` and the generic
    `PeftConfig.from_pretrained` run on a file, before any tuner's own: its dict is used; `None` leaves the file to
    PEFT's own reader, unchanged."""
    original = PeftConfig.from_json_file.__func__  # (defined on PEFT's PeftConfigMixin)
    if getattr(original, "routed_to", None) is not None:
        return

    @functools.wraps(original)
    def from_json_file(cls: type, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        values = reader(cls, path_json_file)
        return original(cls, path_json_file, **kwargs) if values is None else values

    from_json_file.routed_to = reader
    PeftConfig.from_json_file = classmethod(from_json_file)


def route_lora_conversion(converter: Callable[..., Any], handles: Callable[[nn.Module], bool]) -> None:
    """Have PEFT's `convert_to_lora` (also what `peft.save_as_lora` calls) use `converter` for the models that
    `handles(model)` accepts, and PEFT's own conversion for any other, once.

    PEFT's converter names each LoRA tensor after the path of its tuner layer in the `PeftModel`, which for LoRA's own
    layers is the path of the module they wrap; a tuner whose layers are kept beside the model needs its own. The names
    `peft.convert_to_lora`, `peft.tuners.convert_to_lora` and `peft.tuners.lora.convert_to_lora` are replaced; a copy
    imported before this runs stays PEFT's (`from peft import convert_to_lora` ahead of `import surgical_peft`)."""
    original = lora_conversion.convert_to_lora
    if getattr(original, "routed_to", None) is not None:
        return

    @functools.wraps(original)
    def convert_to_lora(
        model: nn.Module,
        rank: float,
        adapter_name: str = "default",
        progressbar: bool = False,
        compile_kwargs: dict | None = None,
    ) -> Any:
        chosen = converter if handles(model) else original
        return chosen(model, rank, adapter_name=adapter_name, progressbar=progressbar, compile_kwargs=compile_kwargs)

    convert_to_lora.routed_to = converter
    for module in (lora_conversion, peft, peft.tuners, peft.tuners.lora):
        if getattr(module, "convert_to_lora", None) is original:
            module.convert_to_lora = convert_to_lora


def route_model_cards(owns: Callable[[PeftModel, str], bool], writer: Callable[[PeftModel, str], None]) -> None:
    """Let `writer(peft_model, directory)` write the model card of `PeftModel.save_pretrained` (and so
    `trainer.save_model`) for the models and directories that `owns(peft_model, directory)` accepts, once; PEFT's
    `create_or_update_model_card` writes every other card, unchanged.

    PEFT has no per-method hook for the card: `PeftModel` is PEFT's own class for every method, and the tuner it
    wraps is not asked. PEFT also writes its card first, before it computes the weights, so a save refused then (a
    NaN in the weights) would leave a new card beside the old adapter. So two methods of PEFT's class are wrapped: its
    card method does nothing for an owned save, and `save_pretrained` has `writer` write the card once the weights
    are saved (on the main process only, as PEFT writes its own). Where PEFT would have written its card, a temporary
    file is created and removed, so that a directory that cannot be written to raises the `OSError` PEFT's card raised
    (naming the path), before any weights are computed."""
    original_card = PeftModel.create_or_update_model_card
    if getattr(original_card, "routed_to", None) is not None:
        return
    original_save = PeftModel.save_pretrained
    parameters = inspect.signature(original_save)

    @functools.wraps(original_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        if not owns(self, output_dir):
            original_card(self, output_dir)
        else:  # where PEFT writes its card first: a directory it cannot write to fails here, as for PEFT's card
            tempfile.TemporaryFile(dir=output_dir).close()

    @functools.wraps(original_save)
    def save_pretrained(self: PeftModel, save_directory: str, *args: Any, **kwargs: Any) -> None:
        bound = parameters.bind(self, save_directory, *args, **kwargs)
        owned = bound.arguments.get("is_main_process", True) and owns(self, save_directory)
        original_save(self, save_directory, *args, **kwargs)
        if owned:
            writer(self, save_directory)

    create_or_update_model_card.routed_to = writer
    PeftModel.create_or_update_model_card = create_or_update_model_card
    PeftModel.save_pretrained = save_pretrained


def read_adapter_lookups_eagerly(tuner_class: type) -> None:
    """Have `PeftModel` evaluate its two properties that look the active adapter up by name outside a compiled graph,
    where its tuner is a `tuner_class`, once; for every other PEFT method they stay PEFT's own.

    `PeftModel.forward` (and its task classes' forwards) reads `has_active_enabled_adapter` and `active_peft_config`
    (`self.peft_config[self.active_adapter]`). torch.compile guards on that lookup (`self.active_adapter == 'a'`), so
    every `set_adapter` recompiled, and past `torch._dynamo.config.cache_size_limit` (8) the model silently ran
    uncompiled. A surgical adapter's weights are the tuned modules' own tensors, switched in place, so adapters on the
    same blocks run the same graph: read eagerly (`torch.compiler.disable`, one graph break before the model's
    forward), switching among them recompiles nothing."""
    for name in ("has_active_enabled_adapter", "active_peft_config"):
        original = getattr(PeftModel, name).fget
        if getattr(original, "eager_for", None) is not None:
            continue
        eager = torch.compiler.disable(original)

        @functools.wraps(original)
        def read(self: PeftModel, original: Any = original, eager: Any = eager) -> Any:
            return eager(self) if isinstance(self.base_model, tuner_class) else original(self)

        read.eager_for = tuner_class
        setattr(PeftModel, name, property(read))


def quiet_get_peft_model(model: nn.Module, config: Any) -> Any:
    """`peft.get_peft_model`, without the `FutureWarning` that PEFT 0.21 triggers on every call by reading
    transformers' deprecated `model.is_gradient_checkpointing` (only that warning is silenced).

    Example:
        >>> import warnings
        >>> from transformers import ResNetConfig, ResNetForImageClassification
        >>> from surgical_peft import SurgicalConfig
        >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("error")  # any other warning would raise
        ...     model = quiet_get_peft_model(base, SurgicalConfig(block="stage1"))
        >>> type(model).__name__, model.peft_config["default"].block
        ('PeftModel', 'stage1')
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)
