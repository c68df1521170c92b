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

Example:
    >>> from surgical_peft.training import STRATEGIES, FineTuneArguments
    >>> "lp-ft" in STRATEGIES.names, FineTuneArguments(strategy="lp-ft", blocks=["stage1"]).adapter_blocks()
    (True, ['head', 'stage1'])
"""

from .arguments import LR_MODES, MIXED_PRECISION, FineTuneArguments, FineTuneResult
from .evaluation import evaluate_accuracy
from .loop import fine_tune
from .strategies import STRATEGIES

__all__ = [
    "LR_MODES",
    "MIXED_PRECISION",
    "STRATEGIES",
    "FineTuneArguments",
    "FineTuneResult",
    "evaluate_accuracy",
    "fine_tune",
]
