"""Differentially private surgical fine-tuning: DP-SGD of the chosen blocks with Opacus (`pip install
'surgical-peft[dp]'`).

Opacus computes per-sample gradients of the trained blocks only, clips each to `privacy.clipping_norm`, adds
Gaussian noise calibrated to (`privacy.epsilon`, `privacy.delta`) for `args.epochs` epochs of Poisson-sampled batches
of expected size `args.batch_size`, and accounts with its RDP accountant. A BatchNorm layer mixes the examples of a
batch, so Opacus refuses it in trainable modules: a block holding one stops before training. Frozen blocks keep
their BatchNorm layers in eval mode (the tuner's rule), so no running statistic moves on private data.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import DataLoader

from ...blocks import is_under, list_blocks
from ...errors import InputError
from ...privacy import check_delta
from ..arguments import FineTuneArguments, FineTuneResult
from ..epoch import train_epoch
from ..evaluation import evaluate_accuracy
from ..optimizer import make_optimizer
from ._base import Phase, private_run_settings

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel

    from ...privacy import PrivacyArguments
    from ..loop import Examples

__all__ = ["STRATEGY", "check_blocks"]

ACCOUNTANT = "rdp"


def check_blocks(model: nn.Module, blocks: list[str]) -> None:
    """An `InputError` if a block to train by DP-SGD holds a BatchNorm layer (Opacus has no per-sample gradient for
    it), naming the alternatives."""
    block_map = list_blocks(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    targets = block_map.target_modules(blocks)
    norms = [
        path
        for path, module in base.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and is_under(path, targets)
    ]
    if norms:
        raise InputError(
            f"dp-surgical cannot train {', '.join(blocks)}: it holds BatchNorm layers ({', '.join(norms[:3])}"
            f"{', ...' if len(norms) > 3 else ''}), whose batch statistics mix examples, and Opacus computes no "
            "per-sample gradients for them. Use --strategy dp-linear-probe, or a LayerNorm block (ViT, DeiT, DINOv2, "
            "ConvNeXt)."
        )


class DPSurgical:
    uses_blocks = True
    privacy_fields = ("epsilon", "delta", "clipping_norm")
    description = "the chosen blocks by DP-SGD with Opacus (no BatchNorm blocks), differentially private"

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        return [Phase("dp-surgical", list(args.blocks), args.epochs, args.learning_rate)]

    def run(
        self,
        model: PeftModel,
        train_dataset: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        accelerator: Accelerator,
    ) -> FineTuneResult:
        """DP-SGD of `args.blocks`; the metrics hold only `eval_accuracy` (a training loss is not accounted for)."""
        privacy = _checked_privacy(model, len(train_dataset), args, accelerator)
        engine, private, optimizer, loader = _make_private(model, train_dataset, args, privacy)
        for epoch in range(args.epochs):
            description = f"dp-surgical epoch {epoch + 1}/{args.epochs}"
            train_epoch(
                private, loader, optimizer, accelerator, cache=None, description=description, progress=args.progress
            )
        private.remove_hooks()
        model = private._module  # the PeftModel that Opacus's GradSampleModule wraps
        model.base_model.train_only(None)
        metrics: dict[str, float] = {}
        if eval_dataset is not None:
            metrics["eval_accuracy"] = evaluate_accuracy(model, DataLoader(eval_dataset, batch_size=args.batch_size))
        record = {
            "epsilon": engine.get_epsilon(privacy.delta),
            "delta": privacy.delta,
            "accountant": ACCOUNTANT,
            "mechanism": "DP-SGD",
            "noise_multiplier": optimizer.noise_multiplier,
            "steps": sum(steps for _, _, steps in engine.accountant.history),
            "sample_rate": loader.sample_rate,
            "clipping_norm": privacy.clipping_norm,
        }
        history = [{"phase": "dp-surgical", "epochs": args.epochs, **metrics}]
        return FineTuneResult(model=model, metrics=metrics, history=history, privacy=record)


def _checked_privacy(
    model: nn.Module, examples: int, args: FineTuneArguments, accelerator: Accelerator
) -> PrivacyArguments:
    """`args.privacy`, once the run is known to be possible (one process, delta, blocks without BatchNorm, Opacus)."""
    privacy = private_run_settings("dp-surgical", args, accelerator, "Opacus' per-sample gradients and accountant")
    check_delta(privacy.delta, examples)
    check_blocks(model, args.blocks)
    if importlib.util.find_spec("opacus") is None:
        raise InputError("dp-surgical needs Opacus: pip install 'surgical-peft[dp]'.")
    return privacy


def _make_private(
    model: PeftModel, train_dataset: Examples, args: FineTuneArguments, privacy: PrivacyArguments
) -> tuple[Any, ...]:
    """Opacus's engine, model, optimizer and Poisson-sampling loader for DP-SGD of `args.blocks` only."""
    from opacus import PrivacyEngine

    model.base_model.set_requires_grad(model.active_adapter, True)
    model.base_model.train_only(list_blocks(model).target_modules(args.blocks))
    parameters = [p for p in model.parameters() if p.requires_grad]
    engine = PrivacyEngine(accountant=ACCOUNTANT)
    private, optimizer, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=make_optimizer(parameters, args.learning_rate, args),
        data_loader=DataLoader(train_dataset, batch_size=args.batch_size),
        target_epsilon=privacy.epsilon,
        target_delta=privacy.delta,
        epochs=args.epochs,
        max_grad_norm=privacy.clipping_norm,
    )
    return engine, private, optimizer, loader


STRATEGY = DPSurgical()
