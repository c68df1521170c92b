"""Sharing adapters on the Hugging Face Hub: a model card from the package's template, a check before the work, and
an atomic push.

| module | what |
|---|---|
| `card.py` | `render_model_card`; `write_model_card`, the one place a card is written (`save_pretrained`'s too) |
| `push.py` | `save_adapter_with_card`, `push_adapter` (a model's adapter), `push_saved_adapter` (a saved directory) |
| `access.py` | `check_push_access`: the Hub reachable, a token that may write, before training |
| `tasks.py` | the base model's task: the card's `pipeline_tag` and how to load the base |

Its names are imported on first use (`surgical_peft.tuner` reads the card module when a model is saved).

Example:
    >>> import torch
    >>> from peft import get_peft_model
    >>> from surgical_peft import SurgicalConfig
    >>> from surgical_peft.hub import render_model_card
    >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(4, 4)), SurgicalConfig(target_modules=["0"]))
    >>> card = render_model_card(model, shift="gaussian_noise", recipe={"strategy": "surgical"})
    >>> print(card.splitlines()[1])
    library_name: peft
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = [
    "BASE_MODEL_PLACEHOLDER",
    "TEMPLATE_PATH",
    "adapter_size",
    "check_push_access",
    "describe_adapter_size",
    "push_adapter",
    "push_saved_adapter",
    "render_model_card",
    "save_adapter_with_card",
    "saved_adapter_directory",
    "write_model_card",
]

_LAZY = {
    "BASE_MODEL_PLACEHOLDER": "card",
    "TEMPLATE_PATH": "card",
    "adapter_size": "card",
    "check_push_access": "access",
    "describe_adapter_size": "card",
    "push_adapter": "push",
    "push_saved_adapter": "push",
    "render_model_card": "card",
    "save_adapter_with_card": "push",
    "saved_adapter_directory": "push",
    "write_model_card": "card",
}

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
