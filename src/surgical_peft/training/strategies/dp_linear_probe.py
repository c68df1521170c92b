"""Differentially private linear probing: NoisyGD of the head on the frozen backbone's features (Wang et al., 2024).

The strategy runs itself (`run`) instead of the loop's minibatch epochs: one forward pass over the private target
computes the head's input features, full-batch NoisyGD trains the head on them (`surgical_peft.privacy`), and the
head ends as a normal surgical adapter on block `head`. Its settings are `FineTuneArguments.privacy`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch.utils.data import DataLoader

from ...blocks import HEAD
from ...privacy import private_linear_probe
from ..arguments import FineTuneArguments, FineTuneResult
from ..evaluation import evaluate_accuracy
from ._base import Phase, private_run_settings

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel

    from ..loop import Examples

__all__ = ["STRATEGY"]


class DPLinearProbe:
    uses_blocks = False
    privacy_fields = ("epsilon", "delta", "feature_norm", "pca_dim", "public_dataset", "steps", "learning_rate",
                      "clipping_norm")  # fmt: skip
    description = "the head by NoisyGD on frozen features, (epsilon, delta)-differentially private"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        return [Phase("dp-linear-probe", [HEAD], 1, args.learning_rate)]  # what the adapter holds; `run` trains

    def run(
        self,
        model: PeftModel,
        train_dataset: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        accelerator: Accelerator,
    ) -> FineTuneResult:
        """Train the head privately; the metrics hold only `eval_accuracy` (a training loss would be a release
        about the private data that the budget does not cover)."""
        settings = private_run_settings(
            "dp-linear-probe", args, accelerator, "full-batch NoisyGD on features computed once"
        )
        model.to(accelerator.device)
        privacy = private_linear_probe(model, train_dataset, settings, batch_size=args.batch_size)
        metrics: dict[str, float] = {}
        if eval_dataset is not None:
            loader = accelerator.prepare(DataLoader(eval_dataset, batch_size=args.batch_size))
            metrics["eval_accuracy"] = evaluate_accuracy(model, loader, accelerator)
        history = [{"phase": "dp-linear-probe", "steps": privacy["steps"], **metrics}]
        return FineTuneResult(model=model, metrics=metrics, history=history, privacy=privacy)


STRATEGY = DPLinearProbe()
