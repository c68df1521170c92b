"""`list_blocks`: a model's blocks, from the first resolver in `RESOLVERS` that knows the model's family.

Example:
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> from surgical_peft import list_blocks
    >>> model = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> list(list_blocks(model))
    ['embedder', 'stage1', 'stage2', 'head']
    >>> list_blocks(model)["stage2"]
    ('resnet.encoder.stages.1',)
"""

from __future__ import annotations

from accelerate.utils import extract_model_from_parallel
from torch import nn

from .block_map import BlockMap
from .resolvers import RESOLVERS

__all__ = ["list_blocks", "unwrap_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module whose parameters a block map names: DDP, DataParallel and `PeftModel` wrappers removed.

    Example:
        >>> from peft import get_peft_model
        >>> from torch import nn
        >>> from surgical_peft import SurgicalConfig
        >>> base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> model = get_peft_model(base, SurgicalConfig(target_modules=["2"]))
        >>> unwrap_model(model) is base, unwrap_model(nn.DataParallel(base)) is base
        (True, True)
    """
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def list_blocks(model: nn.Module) -> BlockMap:
    """The model's blocks in forward order: block name -> module paths, with parameter counts.

    Works on any `nn.Module`; for transformers vision backbones (ResNet, ViT, DeiT, BEiT, DINOv2, ConvNeXt, Swin and
    others of the same shape) the map is structural (see `surgical_peft.blocks.resolvers`), otherwise it lists the
    parameterised top-level modules, which can be passed as `SurgicalConfig(target_modules=...)`.

    Args:
        model: the model, or a `PeftModel` (or DDP) wrapping it.

    Example:
        >>> from transformers import ViTConfig, ViTForImageClassification
        >>> from surgical_peft import list_blocks
        >>> config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2,
        ...                    num_attention_heads=2, intermediate_size=32)
        >>> list(list_blocks(ViTForImageClassification(config)))
        ['embeddings', 'layer1', 'layer2', 'norm', 'head']
    """
    model = unwrap_model(model)
    for resolver in RESOLVERS:
        entries = resolver.entries(model)
        if entries is not None:
            return BlockMap(type(model).__name__, entries, structural=resolver.structural)
    raise AssertionError("the generic resolver answers for every model")
