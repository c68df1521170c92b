"""Training: surgical, full, linear-probe and LP-FT fine-tuning with Accelerate.

Accelerate is the distributed engine: the same code runs on one CPU, on several processes (DDP, gloo on CPU), with
FSDP or DeepSpeed, with mixed precision and gradient accumulation, as configured by `accelerate launch`.

| module | what |
|---|---|
| `arguments.py` | `FineTuneArguments` (how to fine-tune), `FineTuneResult` |
| `strategies/` | one module per strategy: the phases it runs |
| `loop.py` | `fine_tune`: set-up, then each phase |
| `accelerator.py`, `optimizer.py`, `epoch.py`, `evaluation.py`, `checkpoint.py` | the steps of a phase |
| `metrics/` | the accuracy metric, shipped so that `evaluate` loads it offline |

Its names are imported on first use, so that `surgical_peft.training.strategies` (what the command line's help lists)
loads without torch.

Example:
    >>> from surgical_peft.training import STRATEGIES, FineTuneArguments
    >>> "lp-ft" in STRATEGIES.names, FineTuneArguments(strategy="lp-ft", blocks=["stage1"]).adapter_blocks()
    (True, ['head', 'stage1'])
"""

from __future__ import annotations

from ..lazy import lazy_names

__all__ = [
    "LR_MODES",
    "MIXED_PRECISION",
    "STRATEGIES",
    "FineTuneArguments",
    "FineTuneResult",
    "evaluate_accuracy",
    "fine_tune",
]

_LAZY = {
    "LR_MODES": "arguments",
    "MIXED_PRECISION": "arguments",
    "STRATEGIES": "strategies",
    "FineTuneArguments": "arguments",
    "FineTuneResult": "arguments",
    "evaluate_accuracy": "evaluation",
    "fine_tune": "loop",
}


__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())
