"""Compile once, switch freely: `torch.compile(peft_model)` keeps its compiled graph across `set_adapter`.

Where the recompilation came from: `PeftModel.forward` (and the forwards of its task classes) reads two properties
that look the active adapter's config up by its name, `has_active_enabled_adapter` and `active_peft_config`
(`self.peft_config[self.active_adapter]`). torch.compile specialises the graph on that lookup (a guard
`self.active_adapter == 'a'`), so every switch to another adapter recompiled it, and past
`torch._dynamo.config.cache_size_limit` (8) the model silently ran uncompiled. Nothing in a surgical model itself
depends on the name: an adapter's weights are the tuned modules' own tensors, switched in place, so adapters on the
same blocks run the very same graph.

`compile_across_switches` has PEFT evaluate those two properties outside the compiled graph for surgical models only
(`torch.compiler.disable`, one graph break before the model's forward, which compiles as one graph); for every other
PEFT method they are PEFT's own. Switching among adapters on the same blocks in eval mode then recompiles nothing.
Still recompiled, as they change what the graph computes: switching to an adapter on other blocks (other parameters
require grad), train/eval, and PEFT's `modules_to_save` wrappers, which pick their copy by name (the `SEQ_CLS` task
type wraps the classifier). Mixed batches and `fan_out` run each tuned block eagerly (a graph break around each,
`surgical_peft.serving.session`) and the frozen layers between them compiled.

Example:
    >>> import surgical_peft.tuner  # (importing the tuner applies it)
    >>> from peft import PeftModel
    >>> PeftModel.active_peft_config.fget.eager_for.__name__
    'SurgicalModel'
"""

from __future__ import annotations

import functools
from typing import Any

import torch

__all__ = ["compile_across_switches"]

_PROPERTIES = ("has_active_enabled_adapter", "active_peft_config")


def compile_across_switches(tuner_class: type) -> None:
    """Make PEFT's `PeftModel` read its two name-keyed properties eagerly where its tuner is a `tuner_class` (see the
    module docstring); once per process. (PEFT is imported here: the tuner, which PEFT's import registers, calls
    this while this module may still be importing.)"""
    from peft import PeftModel

    for name in _PROPERTIES:
        original = getattr(PeftModel, name).fget
        if getattr(original, "eager_for", None) is not None:
            continue
        eager = torch.compiler.disable(original)

        @functools.wraps(original)
        def read(self: Any, original: Any = original, eager: Any = eager) -> Any:
            return eager(self) if isinstance(self.base_model, tuner_class) else original(self)

        read.eager_for = tuner_class
        setattr(PeftModel, name, property(read))
