"""Blocks of timm models, from timm's own layer groups (`model.group_matcher(coarse=True)`).

timm describes every model's layer groups with regexes over parameter names: a `stem`, the `blocks` (one group per
captured index, e.g. `^layer(\\d+)` for ResNet, `^blocks\\.(\\d+)` for ViT and EfficientNet) and groups that follow
the last block (suffix `(99999,)`, e.g. ViT's final `norm`, EfficientNet's `conv_head`); parameters that match none
are the classifier. This resolver groups the model's tensors the same way and names the groups in this project's
vocabulary:

    stem                the `stem` group
    stage1..N           the blocks of a hierarchical model (ResNet, ConvNeXt, EfficientNet, RegNet, Swin: the
                        resolution falls from one block to the next, per `model.feature_info`)
    layer1..N           the blocks of a ViT-like model (every block at the same resolution)
    norm, <name>        each module after the last block: a normalisation layer is `norm`, others keep their name
    head                the classifier (everything unmatched)

A block is a set of module paths (the tuner tunes every tensor under a module) and, for a tensor the model owns
directly beside its blocks (ViT's `cls_token`, `reg_token` and `pos_embed`, which timm puts in the `stem`), tensor
paths: the tuner tunes such a tensor by itself.

transformers' `TimmWrapperForImageClassification` (what `AutoModelForImageClassification` returns for `timm/...`
checkpoints) holds the timm model under `timm_model`; its blocks are the timm model's, under that prefix. Nothing is
imported from timm: a model is recognised by its class's module and its `group_matcher`. A timm model that declares no
`group_matcher` is left to the other resolvers.

Example:
    >>> from torch import nn
    >>> TimmResolver().entries(nn.Linear(2, 2)) is None  # not a timm model: left to the other resolvers
    True

With timm (`pip install "surgical-peft[timm]"`)::

    model = timm.create_model("resnet18", num_classes=3)
    [entry.name for entry in TimmResolver().entries(model)]  # ['stem', 'stage1', ..., 'stage4', 'head']
    list_blocks(timm.create_model("vit_tiny_patch16_224"))["stem"]  # ('cls_token', 'pos_embed', 'patch_embed')
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..block_map import BlockEntry, parameters_under
from ..names import HEAD
from ..paths import join

__all__ = ["TimmResolver"]

# timm's marker (`timm.models._manipulate.MATCH_PREV_GROUP`) for groups that follow the last block.
_AFTER_BLOCKS = 99999.0
_HEAD = (float("inf"),)
_WRAPPER_ATTRIBUTE = "timm_model"  # TimmWrapperModel / TimmWrapperForImageClassification.base_model_prefix

Ordinal = tuple[float, ...]


def _timm_model(model: nn.Module) -> tuple[nn.Module, str] | None:
    """The timm model inside `model` (itself, or a transformers TimmWrapper's `timm_model`) and its path."""
    inner = getattr(model, _WRAPPER_ATTRIBUTE, None)
    if isinstance(inner, nn.Module) and type(model).__module__.startswith("transformers.models.timm_wrapper"):
        model, prefix = inner, _WRAPPER_ATTRIBUTE
    else:
        prefix = ""
    if type(model).__module__.startswith("timm.") and callable(getattr(model, "group_matcher", None)):
        return model, prefix
    return None


def _compile(matcher: dict[str, Any]) -> list[tuple[re.Pattern[str], int, tuple[int, ...] | None]]:
    """timm's dict matcher as (regex, group ordinal, suffix) rules, in timm's order."""
    rules = []
    for ordinal, spec in enumerate(matcher.values()):
        if spec is None:
            continue
        specs = spec if isinstance(spec, (list, tuple)) else [(spec, None)]
        rules += [(re.compile(pattern), ordinal, suffix) for pattern, suffix in specs]
    return rules


def _ordinals(model: nn.Module) -> dict[str, Ordinal]:
    """Every tensor of `model` (parameters and persistent buffers) -> its layer group's ordinal, as timm sorts them."""
    matcher = model.group_matcher(coarse=True)
    rules = _compile(matcher) if isinstance(matcher, dict) else None

    def ordinal(name: str) -> Ordinal:
        if rules is None:  # a callable matcher returns the ordinal itself
            found = matcher(name)
            return tuple(map(float, found)) if isinstance(found, (list, tuple)) else (float(found),)
        for pattern, group, suffix in rules:
            match = pattern.match(name)
            if match:
                return (float(group), *(float(g) for g in match.groups() if g is not None), *map(float, suffix or ()))
        return _HEAD

    return {name: ordinal(name) for name in model.state_dict(keep_vars=True)}


def _groups_under(group_of: dict[str, Ordinal]) -> dict[str, set[Ordinal]]:
    """Module path -> the groups of the tensors under it (`""`: the whole model)."""
    under: dict[str, set[Ordinal]] = {}
    for name, group in group_of.items():
        parts = name.split(".")
        for depth in range(len(parts)):
            under.setdefault(".".join(parts[:depth]), set()).add(group)
    return under


def _cover(
    module: nn.Module, path: str, group_of: dict[str, Ordinal], under: dict[str, set[Ordinal]]
) -> Iterator[tuple[Ordinal, str]]:
    """(group, module path) for the largest modules whose tensors all lie in one group, in module order; a tensor
    owned directly by a module that spans several groups comes out with its own group and its tensor path."""
    if path and len(under[path]) == 1:
        yield next(iter(under[path])), path
        return
    for name, _ in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
        if join(path, name) in group_of:
            yield group_of[join(path, name)], join(path, name)
    for name, child in module.named_children():
        if join(path, name) in under:
            yield from _cover(child, join(path, name), group_of, under)


def _covering_modules(model: nn.Module) -> list[tuple[Ordinal, str]]:
    """`_cover` of a whole timm model."""
    group_of = _ordinals(model)
    return list(_cover(model, "", group_of, _groups_under(group_of)))


def _is_hierarchical(model: nn.Module) -> bool:
    """Whether the resolution falls from block to block (`feature_info` reductions), as in ResNet or ConvNeXt."""
    info = getattr(model, "feature_info", None) or []
    return len({item.get("reduction") for item in info if isinstance(item, dict)}) > 1


def _name_after_blocks(model: nn.Module, path: str) -> str:
    """A module after the last block: `norm` for a normalisation layer, else its attribute name."""
    return "norm" if "norm" in type(model.get_submodule(path)).__name__.lower() else path.rsplit(".", 1)[-1]


def _entry(model: nn.Module, prefix: str, name: str, paths: list[str]) -> BlockEntry:
    count = sum(tensor.numel() for tensor in parameters_under(model, paths).values())
    return BlockEntry(name, tuple(join(prefix, path) for path in paths), count)


class TimmResolver:
    """timm's layer groups (`group_matcher(coarse=True)`) as blocks, for timm models and transformers' TimmWrapper."""

    name = "timm"
    structural = True

    def entries(self, model: nn.Module) -> list[BlockEntry] | None:
        found = _timm_model(model)
        if found is None:
            return None
        inner, prefix = found
        groups: dict[Ordinal, list[str]] = {}
        for group, path in _covering_modules(inner):
            groups.setdefault(group, []).append(path)
        matcher = inner.group_matcher(coarse=True)
        kinds = list(matcher) if isinstance(matcher, dict) else []
        kind = "stage" if _is_hierarchical(inner) else "layer"
        entries: list[BlockEntry] = []
        index = 0
        for group in sorted(groups):
            paths = groups[group]
            if group == _HEAD:
                entries.append(_entry(inner, prefix, HEAD, paths))
            elif group[-1] == _AFTER_BLOCKS:  # one block per module, named after it
                entries += [_entry(inner, prefix, _name_after_blocks(inner, path), [path]) for path in paths]
            elif len(group) == 1 and kinds:  # a group without an index: the matcher's name for it (`stem`)
                entries.append(_entry(inner, prefix, kinds[int(group[0])], paths))
            else:
                index += 1
                entries.append(_entry(inner, prefix, f"{kind}{index}", paths))
        return entries
