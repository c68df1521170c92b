"""`SurgicalConfig`: which block(s) of a pretrained model to fine-tune, everything else frozen."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError
from peft.config import PeftConfig
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType, TaskType

from ..blocks.names import AUTO
from ..blocks.paths import is_under
from ..criteria import CRITERIA
from ..errors import InputError, NotAPeftConfigError, few
from .fingerprint import check_fingerprint_format
from .serialization import KEY_PREFIX, RECORDED_FIELDS, read_adapter_file

__all__ = ["BIAS_CHOICES", "DELTA_DTYPES", "SurgicalConfig", "read_saved_config"]

DELTA_DTYPES = ("float32", "bfloat16", "float16")
BIAS_CHOICES = ("surgical_only", "all")
# Bounds on the fields that name modules, far above what a model needs, so that a config (a file's, too) with millions
# of names or a 10 MB name is refused at once. PEFT compiles a regex per name of modules_to_save for every module.
_MAX_NAMES = {"block": 100_000, "target_modules": 100_000, "exclude_modules": 100_000, "modules_to_save": 100}
_MAX_CHARACTERS = 100_000  # of one name or regular expression


@dataclass
class SurgicalConfig(PeftConfig):
    """Configuration of a surgical fine-tuning adapter (Lee et al., ICLR 2023: https://huggingface.co/papers/2210.11466).

    Surgical fine-tuning trains one small contiguous block of a pretrained model and freezes the rest. The adapter
    saved by `save_pretrained` holds only the tuned block's deltas (tuned minus base weights, plus its BatchNorm
    running statistics).

    Args:
        block: a block name or a list of them, resolved against the model by `surgical_peft.list_blocks`, e.g.
            `"stage1"` or `["embedder", "stage1"]` on ResNet, `"layer12"` or `"head"` on ViT; `"all"` tunes every block
            (full fine-tuning, stored as deltas); `"auto"` picks the block(s) from target data: resolve it with
            `surgical_peft.select_blocks(model, dataloader, config)` before `get_peft_model`. The resolved module
            paths are written to `target_modules`, which is what a saved adapter records.
        target_modules: module names (exact or suffix match) or a regex, with PEFT's usual semantics; every parameter
            and persistent buffer under a matched module is tuned. Works on any `torch.nn.Module`. When both are given,
            `block` must resolve to the same modules.
        exclude_modules: module names or a regex of modules not to tune, as in PEFT.
        modules_to_save: modules that are trained and saved in full rather than as deltas, e.g. a classification head
            newly initialised for a different number of labels (its weights differ on every fresh base).
        delta_dtype: dtype the parameters' deltas are stored in: `None` keeps each tensor's own dtype;
            `"bfloat16"` or `"float16"` halves their bytes. Buffers (BatchNorm statistics) keep their dtype.
        base_fingerprint: hashes of the base weights, per block, filled in when the adapter is created; loading the
            adapter onto a different base raises an error that names the blocks that differ.
        verify_base: set to `False` to load an adapter onto a base whose fingerprint differs (or that records none),
            e.g. `PeftModel.from_pretrained(model, path, verify_base=False)`. Never saved, and never read from a file:
            only the caller can skip the check.
        auto_criterion: how `block="auto"` ranks the blocks: `"rgn"` (Auto-RGN), `"snr"` (Auto-SNR), `"sweep"`, or
            `"greedy"` (a greedily grown block subset, tuned as chosen); see `surgical_peft.rank_blocks`.
        auto_top_k: how many of the best-ranked blocks `block="auto"` tunes (not used by `"greedy"`).
        init_weights: `True` (default): a new adapter starts from the base weights (zero deltas), so the model computes
            exactly as before; `False`: small random deltas (noise of 2% of each parameter tensor's standard deviation,
            BatchNorm statistics untouched, from torch's global RNG), PEFT's convention for a non-identity adapter
            in tests. Adapters saved without the field load with `True`.
        bias: which biases train, PEFT's option (LoRA's `bias`): `"surgical_only"` (default), those of the tuned
            modules, which train with them; `"all"`: every bias of the model too (a parameter whose name contains
            "bias", as PEFT picks them), each tuned and saved as a delta like the block (BitFit beside the block).
            Such an adapter must be the model's only one (as PEFT allows one LoRA adapter with biases).

    Example:
        >>> from surgical_peft import SurgicalConfig
        >>> SurgicalConfig(block="stage1").peft_type.value
        'SURGICAL'
    """

    block: str | list[str] | None = field(
        default=None, metadata={"help": "Block name(s) to tune, e.g. 'stage1'; see surgical_peft.list_blocks(model)."}
    )
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of the modules to tune (PEFT semantics)."}
    )
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module names or a regex of modules not to tune."}
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Modules trained and saved in full, e.g. a newly initialised classifier."}
    )
    delta_dtype: str | None = field(
        default=None, metadata={"help": f"dtype of the saved deltas, one of {DELTA_DTYPES}; None keeps the weights'."}
    )
    base_fingerprint: dict[str, Any] | None = field(
        default=None, metadata={"help": "Hashes of the base weights per block, recorded when the adapter is created."}
    )
    verify_base: bool = field(
        default=True, metadata={"help": "Refuse to load onto a base whose fingerprint differs. Not saved."}
    )
    auto_criterion: str = field(
        default="rgn", metadata={"help": f"How block='auto' ranks blocks, one of {CRITERIA.names}."}
    )
    auto_top_k: int = field(default=1, metadata={"help": "How many top-ranked blocks block='auto' tunes."})
    init_weights: bool = field(
        default=True, metadata={"help": "True: a new adapter starts at the base weights; False: small random deltas."}
    )
    bias: str = field(
        default="surgical_only",
        metadata={"help": f"Which biases train, one of {BIAS_CHOICES}: the tuned modules' (default), or every bias."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.SURGICAL
        for name in ("block", "target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), (list, tuple, set)):
                setattr(self, name, list(getattr(self, name)))
        check_fields({item.name: getattr(self, item.name) for item in fields(self)})
        if AUTO in self.blocks and len(self.blocks) > 1:
            raise InputError(f"block='auto' picks the blocks itself and cannot be combined with others: {self.block}.")

    @property
    def blocks(self) -> list[str]:
        """`block` as a list (empty when the adapter is defined by `target_modules` alone)."""
        if self.block is None:
            return []
        return [self.block] if isinstance(self.block, str) else list(self.block)

    @property
    def delta_torch_dtype(self) -> torch.dtype | None:
        """`delta_dtype` as a `torch.dtype` (`None`: each tensor keeps its own)."""
        return getattr(torch, self.delta_dtype) if self.delta_dtype else None

    @property
    def loaded_from(self) -> Path | None:
        """For a config read by `from_pretrained`, the directory of the adapter it was read from (else `None`)."""
        return getattr(self, "_loaded_from", None)

    @property
    def saved_modules(self) -> list[str] | None:
        """For a config read by `from_pretrained`, the modules its weights file holds deltas for (else `None`)."""
        return getattr(self, "_saved_modules", None)

    @property
    def saved_tensors(self) -> list[str] | None:
        """For a config read by `from_pretrained`, the tensors its weights file holds deltas for (else `None`)."""
        return getattr(self, "_saved_tensors", None)

    @classmethod
    def from_json_file(cls, path_json_file: str | os.PathLike, **kwargs: Any) -> dict[str, Any]:
        """The fields of a saved config, checked: a problem raises an `InputError` that names the file and the field.
        `verify_base` is dropped: only the caller may skip the base check."""
        path = Path(path_json_file)
        return _surgical_fields(cls, path, _json_object(path))

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None, **kwargs: Any
    ) -> SurgicalConfig:
        """`PeftConfig.from_pretrained`, checked before `PeftModel.from_pretrained` (which loads the config first)
        changes the model: the config's fields, and the weights file's header where there is one (complete, and for a
        file sealed by `save_adapter`, the fields it records, which win over an `adapter_config.json` that disagrees).
        No tensor is read here: a header may announce any size, so the tensors are checked against the model, then read
        and checked (finite, the seal's checksum), when the adapter is added to a model. A directory with the config
        alone (`config.save_pretrained`) reads as a config; loading it as an adapter is refused if the config records
        the base it was trained on (`check_weights_present`).

        Example:
            >>> import tempfile
            >>> directory = tempfile.mkdtemp()
            >>> SurgicalConfig(block="stage1").save_pretrained(directory)
            >>> SurgicalConfig.from_pretrained(directory).block
            'stage1'
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        if not isinstance(config, SurgicalConfig):  # another method's config, read through this class: as PEFT does
            return config
        weights = _weights_file(Path(pretrained_model_name_or_path), subfolder, kwargs)
        config._loaded_from = Path(pretrained_model_name_or_path) / (subfolder or "")
        if weights is None:
            return config
        saved = read_adapter_file(weights)
        if saved.record is not None:
            config._use_record(saved.record, weights)
        tensors = [key.removeprefix(KEY_PREFIX) for key in saved.keys]
        config._saved_tensors = sorted(path for path in tensors if not is_under(path, config.modules_to_save or []))
        config._saved_modules = sorted({path.rpartition(".")[0] for path in config._saved_tensors})
        config._loaded_from = weights.parent
        return config

    def check_weights_present(self) -> None:
        """Raise an `InputError` if this config was read from a directory without its weights file although it
        records the base an adapter was trained on (so its weights are what it stands for): loading it as an adapter
        needs them. A config without a `base_fingerprint` (as `config.save_pretrained` writes one) starts a new
        adapter.

        Example:
            >>> SurgicalConfig(block="stage1").check_weights_present()  # not read from a file: nothing to miss
        """
        if self.loaded_from is None or self.saved_modules is not None or self.base_fingerprint is None:
            return
        raise InputError(
            f"{self.loaded_from} holds no {SAFETENSORS_WEIGHTS_NAME} (nor {WEIGHTS_NAME}): an incomplete adapter (its "
            "config records the base it was trained on, so it needs its weights). To start a new adapter from this "
            "config instead, set its base_fingerprint to None."
        )

    def _use_record(self, record: Mapping[str, Any], weights: Path) -> None:
        try:
            check_fields(record)
        except InputError as error:
            raise InputError(f"{weights}: the config fields it records: {error}") from error
        differing = [name for name in RECORDED_FIELDS if name in record and getattr(self, name) != record[name]]
        if differing:
            warnings.warn(
                f"{weights.with_name(CONFIG_NAME)} disagrees with {weights} on {', '.join(differing)}; using what "
                "the weights file recorded when saved (an edited config, or a save interrupted between renames).",
                stacklevel=3,
            )
        for name in differing:
            setattr(self, name, record[name])

    def to_dict(self) -> dict[str, Any]:
        """The saved form: everything but `verify_base`, which is a loading-time choice."""
        output = super().to_dict()
        output.pop("verify_base", None)
        return output


def _weights_file(path: Path, subfolder: str | None, kwargs: Mapping[str, Any]) -> Path | None:
    """The adapter's weights file: `adapter_model.safetensors` (else PEFT's `adapter_model.bin`, as PEFT falls back
    to it) in the local directory, or `adapter_model.safetensors` downloaded (cached) from the Hub; `None` where the
    directory or the Hub repository holds the config alone. Something other than a regular file at a weights file's
    name (a directory, a device, a dangling symlink) is a damaged adapter: an `InputError`."""
    directory = path / (subfolder or "")
    if (directory / CONFIG_NAME).is_file():
        for weights in (directory / SAFETENSORS_WEIGHTS_NAME, directory / WEIGHTS_NAME):
            if weights.is_file():
                return weights
            if os.path.lexists(weights):  # a directory, a device, a dangling link: damage, not a config alone
                raise InputError(f"{weights} is not a regular file ({_kind_of_entry(weights)}): a damaged adapter.")
        return None
    hub_kwargs, _, _ = SurgicalConfig._split_kwargs(dict(kwargs))
    hub_kwargs.pop("subfolder", None)
    try:
        return Path(hf_hub_download(str(path), SAFETENSORS_WEIGHTS_NAME, subfolder=subfolder, **hub_kwargs))
    except EntryNotFoundError:  # the repository holds the config only
        return None
    except Exception as error:  # huggingface_hub raises many types: offline, no such repository
        raise InputError(f"Cannot find {SAFETENSORS_WEIGHTS_NAME} for the adapter {path}: {error}") from error


def _kind_of_entry(path: Path) -> str:
    """What stands at `path`, which is no regular file, in words."""
    if path.is_symlink():
        target = os.readlink(path)
        return f"a symlink to {target}, which does not exist" if not path.exists() else f"a symlink to {target}"
    return "a directory" if path.is_dir() else "a special file"


def _json_object(path: Path) -> dict[str, Any]:
    try:
        values = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:  # (nested too deep)
        raise InputError(f"{path} is not a readable JSON file: {error}") from error
    if not isinstance(values, dict):
        raise InputError(f"{path} must hold a JSON object (a PEFT config), not a {type(values).__name__}.")
    return values


def _no_peft_type(cls: type, path: Path) -> NotAPeftConfigError:
    """The error for a config file without `peft_type`, in PEFT's words (a `TypeError`) after the file's name."""
    return NotAPeftConfigError(
        f"{path}: The {cls.__name__} config that is trying to be loaded is missing required keys: {{'peft_type'}}. "
        "With no peft_type field, PEFT cannot tell which method's adapter it holds."
    )


def _surgical_fields(cls: type, path: Path, values: dict[str, Any]) -> dict[str, Any]:
    """`values`, read from `path` by the config class `cls`, as a surgical adapter's config fields, checked (naming
    the file and the field), without `verify_base` (only the caller may skip the base check) and PEFT's runtime-only
    `runtime_config`."""
    if "peft_type" not in values:
        raise _no_peft_type(cls, path)
    if values["peft_type"] != PeftType.SURGICAL.value:
        raise InputError(f"{path}: peft_type is {values['peft_type']!r:.100}, a surgical adapter's is 'SURGICAL'.")
    if "verify_base" in values:
        warnings.warn(f"{path} holds verify_base, which is never saved: ignored.", stacklevel=4)
        del values["verify_base"]
    values.pop("runtime_config", None)  # a runtime-only PEFT setting, as PEFT's own reader does
    try:
        check_fields(values)
    except InputError as error:
        raise InputError(f"{path}: {error}") from error
    return values


def read_saved_config(cls: type, path_json_file: str | os.PathLike) -> dict[str, Any] | None:
    """Read an adapter config for PEFT (`tuner._internals.route_config_reads`): a surgical adapter's through
    `SurgicalConfig.from_json_file` whichever PEFT class reads it (so the generic `PeftConfig.from_pretrained` checks
    its fields and drops `verify_base` too); a file that is no JSON object, or whose `peft_type` is unknown, raises an
    `InputError` naming the file and the field, and one without `peft_type` where PEFT needs it to pick the config
    class a `NotAPeftConfigError` (PEFT's `TypeError`); any other file is left to PEFT (`None`)."""
    path = Path(path_json_file)
    values = _json_object(path)
    peft_type = values.get("peft_type")
    if peft_type == PeftType.SURGICAL.value:
        return _surgical_fields(cls, path, values)
    if peft_type is None and cls is PeftConfig:  # PEFT picks the config class by the type
        raise _no_peft_type(cls, path)
    if peft_type is not None and peft_type not in PEFT_TYPE_TO_CONFIG_MAPPING:
        known = ", ".join(sorted(str(getattr(name, "value", name)) for name in PEFT_TYPE_TO_CONFIG_MAPPING))
        raise InputError(f"{path}: unknown peft_type {peft_type!r:.100}. Valid: {known}.")
    return None


def _check_sizes(values: Mapping[str, Any]) -> None:
    """An `InputError` if a field that names modules lists more names than `_MAX_NAMES` allows, or holds a name (or
    regular expression) longer than `_MAX_CHARACTERS`."""
    for name, limit in _MAX_NAMES.items():
        value = values.get(name)
        if isinstance(value, list) and len(value) > limit:
            raise InputError(f"{name} lists {len(value):,} names ({few(value)}); at most {limit:,} are allowed.")
        items = value if isinstance(value, list) else [value]
        longest = max((len(item) for item in items if isinstance(item, str)), default=0)
        if longest > _MAX_CHARACTERS:
            shown = few([item for item in items if isinstance(item, str) and len(item) == longest])
            raise InputError(
                f"{name} holds a name of {longest:,} characters ({shown}); at most {_MAX_CHARACTERS:,} are allowed."
            )


def _check_patterns(name: str, value: Any) -> None:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as error:
            raise InputError(f"{name} is not a valid regular expression: {few([value])} ({error}).") from error
    elif value is not None and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
        raise InputError(f"{name} must be a regex string, a list of module names or null, got {value!r:.100}.")


def check_fields(values: Mapping[str, Any]) -> None:
    """Raise an `InputError` naming the first of the config fields in `values` whose value is invalid.

    Example:
        >>> check_fields({"target_modules": "(["})
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: target_modules is not a valid regular expression: '([' (...).
    """
    _check_sizes(values)
    block = values.get("block")
    valid_list = isinstance(block, list) and block and all(isinstance(name, str) for name in block)
    if block is not None and not isinstance(block, str) and not valid_list:
        raise InputError(f"`block` must be a block name or a non-empty list of them, got {block!r:.100}.")
    for name in ("target_modules", "exclude_modules"):
        _check_patterns(name, values.get(name))
    to_save = values.get("modules_to_save")
    if to_save is not None and not (isinstance(to_save, list) and all(isinstance(item, str) for item in to_save)):
        raise InputError(f"modules_to_save must be a list of module names or null, got {to_save!r:.100}.")
    if values.get("delta_dtype") not in (None, *DELTA_DTYPES):
        raise InputError(f"Unknown delta_dtype {values['delta_dtype']!r}. Valid: None, {', '.join(DELTA_DTYPES)}.")
    if values.get("base_fingerprint") is not None:
        check_fingerprint_format(values["base_fingerprint"])
    if values.get("auto_criterion", CRITERIA.names[0]) not in CRITERIA.names:
        raise InputError(f"Unknown auto_criterion {values['auto_criterion']!r}. Valid: {', '.join(CRITERIA.names)}.")
    top_k = values.get("auto_top_k", 1)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise InputError(f"auto_top_k must be an int of at least 1, got {top_k!r}.")
    task_type = values.get("task_type")
    if task_type is not None and task_type not in TaskType.__members__:
        raise InputError(f"Unknown task_type {task_type!r:.100}. Valid: None, {', '.join(TaskType.__members__)}.")
    if values.get("bias", BIAS_CHOICES[0]) not in BIAS_CHOICES:
        raise InputError(
            f"Unknown bias {values['bias']!r:.100}. Valid: {', '.join(BIAS_CHOICES)} ('surgical_only': the tuned "
            "modules' biases, which train with them; 'all': every bias of the model too)."
        )
    if not isinstance(values.get("init_weights", True), bool):
        raise InputError(f"init_weights must be True or False, got {values['init_weights']!r}.")
    if not isinstance(values.get("verify_base", True), bool):
        raise InputError(f"verify_base must be True or False, got {values['verify_base']!r}.")
