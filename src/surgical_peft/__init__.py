"""surgical-peft: surgical fine-tuning (Lee et al., ICLR 2023) as a PEFT method.

Importing the package registers the `"SURGICAL"` PEFT type, so that `peft.get_peft_model`, `PeftModel.from_pretrained`,
`PeftConfig.from_pretrained` and `AutoPeftModel*.from_pretrained` work with `SurgicalConfig` and with adapters saved
from it, whether PEFT is imported before or after (`surgical_peft.registration`). The import itself is light: it
loads neither torch nor PEFT; each public name is imported on first use.

Example:
    >>> import surgical_peft
    >>> from peft import get_peft_model
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> model = get_peft_model(base, surgical_peft.SurgicalConfig(block="stage1"))
    >>> model.print_trainable_parameters()
    trainable params: 92 || all params: 1,766 || trainable%: 5.2095

One input through several adapters, the frozen layers before their blocks computed once (`surgical_peft.serving`):

    >>> import torch
    >>> model.add_adapter("head", surgical_peft.SurgicalConfig(block="head"))
    >>> outputs = surgical_peft.fan_out(model.eval(), ["default", "head"], pixel_values=torch.randn(2, 3, 32, 32))
    >>> {name: tuple(output.logits.shape) for name, output in outputs.items()}
    {'default': (2, 2), 'head': (2, 2)}
"""

from __future__ import annotations

from .lazy import lazy_names
from .registration import register_with_peft

__version__ = "0.1.0"
__all__ = [
    "BlockMap",
    "BlockRanking",
    "SurgicalConfig",
    "SurgicalModel",
    "convert_to_lora",
    "fan_out",
    "list_blocks",
    "rank_blocks",
    "save_adapter",
    "save_as_lora",
    "select_blocks",
]

_LAZY = {
    "BlockMap": "blocks",
    "BlockRanking": "selection",
    "SurgicalConfig": "tuner",
    "SurgicalModel": "tuner",
    "convert_to_lora": "tuner",
    "fan_out": "serving.fan_out",
    "list_blocks": "blocks",
    "rank_blocks": "selection",
    "save_adapter": "tuner",
    "save_as_lora": "tuner",
    "select_blocks": "selection",
}

register_with_peft()


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
