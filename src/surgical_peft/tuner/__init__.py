"""The PEFT method, in the shape of PEFT's own tuners: `SurgicalConfig` (config.py), `SurgicalLayer` (layer.py),
`SurgicalModel` (model.py), with base fingerprints (fingerprint.py) and adapter files (serialization.py). Every
private PEFT or PyTorch internal they use is in `_internals.py`.

Importing this package registers the `"SURGICAL"` type with PEFT, has PEFT read a surgical adapter's config through
`SurgicalConfig.from_json_file` (checked fields, no `verify_base` from a file) whichever PEFT class reads it, has
PEFT's `convert_to_lora`/`save_as_lora` convert surgical adapters with `lora_export.convert_to_lora`, has PEFT's
`save_pretrained` write this package's model card for a surgical adapter (`surgical_peft.hub.card`), and keeps
`torch.compile(peft_model)` from recompiling on `set_adapter` (`_internals.read_adapter_lookups_eagerly`).

Example:
    >>> from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    >>> from peft.utils import PeftType
    >>> PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.SURGICAL].__name__
    'SurgicalConfig'
"""

from ._internals import (
    add_peft_type,
    quiet_get_peft_model,
    read_adapter_lookups_eagerly,
    register_method,
    route_config_reads,
    route_lora_conversion,
    route_model_cards,
)

SURGICAL = add_peft_type("SURGICAL")  # before the config is defined: its peft_type is a member of the enum

from .config import DELTA_DTYPES, SurgicalConfig, read_saved_config  # noqa: E402
from .layer import SurgicalLayer  # noqa: E402
from .lora_export import convert_to_lora, converts_to_lora, save_as_lora  # noqa: E402
from .model import SurgicalModel  # noqa: E402
from .serialization import save_adapter  # noqa: E402

__all__ = [
    "DELTA_DTYPES",
    "SurgicalConfig",
    "SurgicalLayer",
    "SurgicalModel",
    "convert_to_lora",
    "quiet_get_peft_model",
    "save_adapter",
    "save_as_lora",
]


def _owns_card(model: object, directory: str) -> bool:
    """Whether `save_pretrained` writes this package's card (`surgical_peft.hub.card.owns_card`)."""
    from ..hub.card import owns_card  # (imported when a model is saved)

    return owns_card(model, directory)


def _write_card(model: object, directory: str) -> None:
    """The card `save_pretrained` writes for a surgical adapter: this package's (`surgical_peft.hub.card`)."""
    from ..hub.card import write_card_on_save

    write_card_on_save(model, directory)


register_method(SURGICAL, SurgicalConfig, SurgicalModel)
route_config_reads(read_saved_config)
route_lora_conversion(convert_to_lora, converts_to_lora)
read_adapter_lookups_eagerly(SurgicalModel)
route_model_cards(_owns_card, _write_card)
