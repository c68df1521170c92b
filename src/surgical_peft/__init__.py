"""surgical-peft: surgical fine-tuning (Lee et al., ICLR 2023) as a PEFT method.

Importing the package registers the `"SURGICAL"` PEFT type, so that `peft.get_peft_model`, `PeftModel.from_pretrained`
and `AutoPeftModel*.from_pretrained` work with `SurgicalConfig` and with adapters saved from it.

Example:
    >>> import surgical_peft
    >>> from peft import get_peft_model
    >>> from transformers import ResNetConfig, ResNetForImageClassification
    >>> base = ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1]))
    >>> model = get_peft_model(base, surgical_peft.SurgicalConfig(block="stage1"))
    >>> model.print_trainable_parameters()
    trainable params: 92 || all params: 1,766 || trainable%: 5.2095
"""

from aenum import extend_enum
from peft.utils import PeftType, register_peft_method

# PEFT's registry only takes members of its closed PeftType enum, so the type is added to it first.
if "SURGICAL" not in PeftType.__members__:
    extend_enum(PeftType, "SURGICAL", "SURGICAL")

from .blocks import BlockMap, list_blocks
from .config import SurgicalConfig
from .deltas import save_adapter
from .model import SurgicalModel
from .selection import BlockRanking, rank_blocks, select_blocks

__version__ = "0.1.0"
__all__ = [
    "BlockMap",
    "BlockRanking",
    "SurgicalConfig",
    "SurgicalModel",
    "list_blocks",
    "rank_blocks",
    "save_adapter",
    "select_blocks",
]


def _register() -> None:
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    if PeftType.SURGICAL not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="surgical", config_cls=SurgicalConfig, model_cls=SurgicalModel)


_register()
