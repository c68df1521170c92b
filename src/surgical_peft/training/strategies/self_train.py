"""Self-training on unlabelled target images: a surgically tuned teacher labels them, the confident labels are kept,
and a student adapter trains on the labelled images plus the kept pseudo-labelled ones.

Each round trains an ensemble of `ensemble_size` surgical adapters of `blocks` on the one base model (PEFT's
several adapters per base; seeds `seed`, `seed + 1`, ...) on the round's training set: the labelled images in the
first round, the labelled plus the pseudo-labelled images of the round before after it. The first member (seed
`seed`: the adapter `strategy="surgical"` gives) is the teacher: it labels every unlabelled image. A pseudo-label is
kept when the predictive entropy of the ensemble's mean prediction, divided by log(classes) (0: certain, 1: uniform),
is at most `pseudo_label_threshold`. The student, the run's adapter, then trains on the labelled images plus the
pseudo-labels kept in the last round.

The uncertainty is the ensemble's, not MC dropout's: it applies to every model (the ResNets and ConvNeXts here have
no dropout layer to sample), its members are cheap (adapters of a few blocks on one shared base), and it is
deterministic for a seed. The true labels of the unlabelled images, when known (`labels` in their examples), only
score the pseudo-labels in the report (`pseudo_label_accuracy`); a training example is built from an image and its
pseudo-label alone.

Example:
    >>> from surgical_peft.training import FineTuneArguments
    >>> args = FineTuneArguments(strategy="self-train", blocks=["stage1"], unlabeled_dataset=[], ensemble_size=2)
    >>> [(phase.name, phase.blocks) for phase in args.phases()]
    [('self-train', ['stage1'])]
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

from ...blocks import AUTO
from ...errors import InputError
from ..arguments import FineTuneArguments, FineTuneResult
from ..loop import adapter_config, fine_tune
from ._base import Phase

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel

    from ..loop import Examples

__all__ = ["STRATEGY", "pseudo_labels"]

_MAX_SEED = 2**32


def _probabilities(model: PeftModel, dataset: Examples, batch_size: int, device: torch.device) -> torch.Tensor:
    """The active adapter's softmax predictions for every image of `dataset`, in order (its labels are not read)."""
    model.eval()
    batches = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            batches.append(model(pixel_values=batch["pixel_values"].to(device)).logits.softmax(-1).cpu())
    return torch.cat(batches)


def pseudo_labels(member_probabilities: list[torch.Tensor], threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's labels (the first member's argmax) and which to keep: the normalised entropy of the members'
    mean prediction at most `threshold`.

    Example:
        >>> sure, unsure = [0.98, 0.01, 0.01], [0.4, 0.3, 0.3]
        >>> labels, keep = pseudo_labels([torch.tensor([sure, unsure]), torch.tensor([sure, [0.3, 0.4, 0.3]])], 0.2)
        >>> labels.tolist(), keep.tolist()
        ([0, 0], [True, False])
    """
    mean = torch.stack(member_probabilities).mean(0)
    entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1) / math.log(mean.shape[-1])
    return member_probabilities[0].argmax(-1), entropy <= threshold


class SelfTrain:
    uses_blocks = True
    description = (
        "teacher-student self-training: a surgical teacher labels --unlabeled-n target images, the student trains on "
        "the labelled and the confident pseudo-labelled ones"
    )

    def phases(self, args: FineTuneArguments) -> list[Phase]:
        if args.blocks == [AUTO]:
            raise InputError(
                "strategy='self-train' needs the teacher's blocks named (e.g. blocks=['stage1']), not 'auto'."
            )
        return [Phase("self-train", list(dict.fromkeys(args.blocks)), args.epochs, args.learning_rate)]

    def _ensemble(
        self,
        model: PeftModel,
        data: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        round_: int,
        accelerator: Accelerator,
    ) -> tuple[list[torch.Tensor], float | None]:
        """Train the round's ensemble on `data`; each member's predictions on the unlabelled images, and the
        teacher's eval accuracy (with an `eval_dataset`). The members are deleted again."""
        members, teacher_accuracy = [], None
        for index in range(args.ensemble_size):
            name = f"self-train-{round_}-{index}"
            model.add_adapter(name, adapter_config(args))
            model.set_adapter(name)
            seed = (args.seed + index) % _MAX_SEED
            member_args = replace(args, seed=seed)
            result = fine_tune(model, data, eval_dataset if index == 0 else None, member_args, accelerator=accelerator)
            teacher_accuracy = result.metrics.get("eval_accuracy") if index == 0 else teacher_accuracy
            members.append(_probabilities(model, args.unlabeled_dataset, args.batch_size, accelerator.device))
            model.delete_adapter(name)
        return members, teacher_accuracy

    def _round(
        self,
        model: PeftModel,
        data: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        round_: int,
        accelerator: Accelerator,
    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """One round: the ensemble on `data`, then the pseudo-labelled examples it keeps and the round's record."""
        members, teacher_accuracy = self._ensemble(model, data, eval_dataset, args, round_, accelerator)
        labels, keep = pseudo_labels(members, args.pseudo_label_threshold)
        kept = [int(i) for i in keep.nonzero().flatten()]
        examples = [
            {"pixel_values": args.unlabeled_dataset[i]["pixel_values"], "labels": int(labels[i])} for i in kept
        ]
        record: dict[str, Any] = {"phase": f"self-train round {round_}", "pseudo_labels_kept": len(kept)}
        record["unlabeled"] = len(labels)
        if teacher_accuracy is not None:
            record["teacher_eval_accuracy"] = teacher_accuracy
        truth = [args.unlabeled_dataset[i].get("labels") for i in kept]
        if kept and None not in truth:  # scored only: the examples above hold the pseudo-labels alone
            right = [int(labels[i]) == label for i, label in zip(kept, truth, strict=True)]
            record["pseudo_label_accuracy"] = sum(right) / len(right)
        return examples, record

    def run(
        self,
        model: PeftModel,
        train_dataset: Examples,
        eval_dataset: Examples | None,
        args: FineTuneArguments,
        accelerator: Accelerator,
    ) -> FineTuneResult:
        """Rounds of teachers and pseudo-labels, then the student in the run's adapter. Nothing is checkpointed: the
        pseudo-labels depend on every epoch of the ensembles (a rerun with more `epochs` would resume a student of
        other pseudo-labels), so a rerun starts over."""
        if args.unlabeled_dataset is None:
            raise InputError(
                "strategy='self-train' needs unlabelled target images: unlabeled_dataset=... (on the command line "
                "--unlabeled-n N)."
            )
        surgical = replace(args, strategy="surgical", output_dir=None, report_to="none")  # (the outer run logs)
        student, history, data = model.active_adapter, [], train_dataset
        for round_ in range(1, args.self_train_rounds + 1):
            examples, record = self._round(model, data, eval_dataset, surgical, round_, accelerator)
            history.append(record)
            data = ConcatDataset([train_dataset, examples]) if examples else train_dataset
        model.set_adapter(student)
        result = fine_tune(
            model, data, eval_dataset, replace(surgical, unlabeled_dataset=None), accelerator=accelerator
        )
        last = {key: value for key, value in history[-1].items() if key.startswith("pseudo_label")}
        metrics = {**result.metrics, **last}
        return FineTuneResult(model=result.model, metrics=metrics, history=[*history, *result.history])


STRATEGY = SelfTrain()
