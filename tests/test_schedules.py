"""Schedules: alternating blocks, gradual unfreezing and discriminative learning rates (`lr_decay`), as strategies
of the training loop: what each epoch trains, at which rates, what the adapter holds, resuming mid-schedule, and bad
input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import build_model
from torch import nn

import surgical_peft.training.loop
from surgical_peft.cli import main
from surgical_peft.training import FineTuneArguments, fine_tune

DATA = [
    {"pixel_values": torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(i)), "labels": i % 3}
    for i in range(8)
]
BLOCK_PREFIX = {"stage1": "resnet.encoder.stages.0.", "stage2": "resnet.encoder.stages.1.", "head": "classifier."}


class Recorder:
    """Every optimizer the loop makes for `model`, one per phase: per parameter group, its tensors' blocks and rate."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.optimizers: list[list[tuple[set[str], float]]] = []
        self.made: list[torch.optim.Optimizer] = []

    def groups(self, optimizer: torch.optim.Optimizer) -> None:
        names = {id(p): name for name, p in self.model.named_parameters()}
        groups = optimizer.param_groups
        self.optimizers.append([({_block(names[id(p)]) for p in group["params"]}, group["lr"]) for group in groups])
        self.made.append(optimizer)

    def adam_steps(self) -> dict[str, set[int]]:
        """Per block, the AdamW step counts of its tensors in the (one) optimizer: how many steps trained each."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        (optimizer,) = self.made
        steps: dict[str, set[int]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                steps.setdefault(_block(names[id(p)]), set()).add(int(state["step"]) if "step" in state else 0)
        return steps


def _block(name: str) -> str | None:
    return next((block for block, prefix in BLOCK_PREFIX.items() if prefix in name), None)


@pytest.fixture
def record(monkeypatch: pytest.MonkeyPatch):
    """`record(model)`: a `Recorder` of the optimizers the loop makes while it fine-tunes `model`."""
    original = surgical_peft.training.loop.make_optimizer
    recorders: list[Recorder] = []

    def recording(*args: object, **kwargs: object) -> torch.optim.AdamW:
        optimizer = original(*args, **kwargs)
        recorders[-1].groups(optimizer)
        return optimizer

    monkeypatch.setattr(surgical_peft.training.loop, "make_optimizer", recording)

    def record(model: nn.Module) -> Recorder:
        recorders.append(Recorder(model))
        return recorders[-1]

    return record


def tuned(model: nn.Module, args: FineTuneArguments) -> dict[str, bool]:
    """Fine-tune `model` on `DATA`; which blocks changed."""
    before = {name: tensor.clone() for name, tensor in model.state_dict().items() if tensor.is_floating_point()}
    after = fine_tune(model, DATA, None, args).model.base_model.model.state_dict()
    changed = dict.fromkeys(BLOCK_PREFIX, False)
    for name, tensor in before.items():
        if _block(name) and not torch.equal(after[name], tensor):
            changed[_block(name)] = True
    return changed


def test_alternate_trains_one_block_per_epoch_with_one_optimizer(record) -> None:
    args = FineTuneArguments(strategy="alternate", blocks=["stage1", "head"], epochs=3, batch_size=4, progress=False)
    assert [phase.blocks for phase in args.phases()] == [["stage1"], ["head"], ["stage1"]]
    assert args.adapter_blocks() == ["stage1", "head"]
    model = build_model("resnet-basic")
    recorder = record(model)
    changed = tuned(model, args)
    assert [[blocks for blocks, _ in groups] for groups in recorder.optimizers] == [[{"stage1", "head"}]]
    # 2 steps per epoch (8 examples, batch 4): stage1 trained in epochs 1 and 3, its AdamW state kept across
    # the head's epoch (a new optimizer would have restarted it at 0 and counted 2).
    assert recorder.adam_steps() == {"stage1": {4}, "head": {2}}
    assert changed == {"stage1": True, "stage2": False, "head": True}
    model = build_model("resnet-basic")
    record(model)
    first_epoch = tuned(model, FineTuneArguments(**{**vars(args), "epochs": 1}))
    assert first_epoch == {"stage1": True, "stage2": False, "head": False}


@pytest.mark.parametrize(
    ("switch_every", "steps"), [(1, {"stage1": {2}, "head": {2}}), (3, {"stage1": {3}, "head": {1}})]
)
def test_alternate_switches_every_k_steps_counted_across_epochs(record, switch_every: int, steps: dict) -> None:
    args = FineTuneArguments(
        strategy="alternate",
        blocks=["stage1", "head"],
        epochs=2,
        batch_size=4,
        switch_every=switch_every,
        progress=False,
    )
    assert [(phase.blocks, phase.epochs) for phase in args.phases()] == [(["stage1", "head"], 2)]
    model = build_model("resnet-basic")
    recorder = record(model)
    assert tuned(model, args) == {"stage1": True, "stage2": False, "head": True}
    assert recorder.adam_steps() == steps  # 4 steps in turns of k: stage1 first


def test_gradual_unfreezes_one_block_per_epoch_towards_the_input(record) -> None:
    args = FineTuneArguments(strategy="gradual", blocks=["stage1", "stage2"], epochs=4, batch_size=4, progress=False)
    model = build_model("resnet-basic")
    recorder = record(model)
    changed = tuned(model, args)
    assert len(recorder.optimizers) == 1  # one optimizer: the head's AdamW state carries on from stage to stage
    assert recorder.adam_steps() == {"head": {8}, "stage2": {6}, "stage1": {4}}  # 4, 3 and 2 epochs of 2 steps
    assert [phase.epochs for phase in args.phases()] == [1, 1, 2]
    assert changed == {"stage1": True, "stage2": True, "head": True}


def test_lr_decay_gives_each_block_below_the_top_a_smaller_rate(record) -> None:
    args = FineTuneArguments(
        blocks=["stage1", "head"], epochs=1, batch_size=4, learning_rate=0.01, lr_decay=0.5, progress=False
    )
    model = build_model("resnet-basic")
    recorder = record(model)
    tuned(model, args)
    # blocks: embedder, stage1, stage2, head: the head is at depth 0, stage1 at depth 2
    assert sorted(recorder.optimizers[0], key=lambda group: group[1]) == [({"stage1"}, 0.0025), ({"head"}, 0.01)]
    model = build_model("resnet-basic")
    recorder = record(model)
    tuned(model, FineTuneArguments(**{**vars(args), "lr_decay": 1.0}))
    assert recorder.optimizers[0] == [({"stage1", "head"}, 0.01)]  # no decay: one group


def test_a_schedule_resumes_mid_way(tmp_path: Path) -> None:
    args = FineTuneArguments(
        strategy="alternate",
        blocks=["stage1", "head"],
        epochs=2,
        batch_size=4,
        output_dir=str(tmp_path),
        progress=False,
    )
    fine_tune(build_model("resnet-basic"), DATA, DATA, args)
    progress_file = tmp_path / "checkpoints" / "checkpoint_1" / "progress.json"
    progress = json.loads(progress_file.read_text())
    assert progress["phase"] == 1 and progress["epochs_done"] == [1, 1]
    progress["history"][0]["marker"] = "from the checkpoint"
    progress_file.write_text(json.dumps(progress))
    result = fine_tune(build_model("resnet-basic"), DATA, DATA, FineTuneArguments(**{**vars(args), "epochs": 3}))
    assert [record["phase"] for record in result.history] == ["alternate 1/2", "alternate 2/2", "alternate 3/3"]
    assert result.history[0]["marker"] == "from the checkpoint" and "marker" not in result.history[2]
    assert result.model.peft_config["default"].block == ["stage1", "head"]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"strategy": "alternate", "blocks": ["stage1"]},
            r"trains several blocks one at a time; got one: \['stage1'\]",
        ),
        ({"strategy": "alternate", "blocks": ["head", "head"]}, r"got one: \['head'\]"),
        ({"strategy": "gradual", "blocks": ["head"]}, r"unfreezes blocks below the head, one per epoch"),
        (
            {"strategy": "gradual", "blocks": ["stage1", "stage2"], "epochs": 2},
            r"need at least 3 epochs, got epochs=2",
        ),
        ({"lr_decay": 0.0}, r"lr_decay must be in \(0, 1\] \(1: no decay\), got 0.0"),
        ({"lr_decay": 1.5}, r"lr_decay must be in \(0, 1\]"),
        ({"lr_decay": 0.5, "lr_mode": "rgn"}, r"lr_decay and lr_mode='rgn' both set per-tensor learning rates"),
        (
            {"strategy": "alternate", "blocks": ["stage1", "head"], "switch_every": 0},
            r"switch_every must be at least 1",
        ),
        ({"switch_every": 2}, r"switch_every=2 switches the blocks of strategy='alternate'; it does not apply to"),
        (
            {"strategy": "cyclic"},
            r"Unknown strategy 'cyclic'. Valid: alternate, dp-linear-probe, dp-surgical, full, gradual, linear-probe",
        ),
    ],
)
def test_bad_schedules(settings: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FineTuneArguments(**settings)


def test_the_command_line_refuses_a_bad_schedule_with_status_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    common = ["train", "--model", str(tmp_path / "never-loaded"), "--output-dir", str(tmp_path / "run")]
    assert main([*common, "--strategy", "alternate", "--block", "stage1"]) == 2
    assert "strategy='alternate' trains several blocks one at a time" in capsys.readouterr().err
    assert main([*common, "--lr-decay", "2"]) == 2
    assert "lr_decay must be in (0, 1]" in capsys.readouterr().err
    assert (
        main([*common, "--strategy", "alternate", "--block", "stage1", "--block", "head", "--switch-every", "0"]) == 2
    )
    assert "switch_every must be at least 1, got 0." in capsys.readouterr().err
    assert main([*common, "--block", "stage1", "--switch-every", "3"]) == 2
    assert "switch_every=3 switches the blocks of strategy='alternate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse refuses an unknown schedule with status 2
        main([*common, "--strategy", "cyclic"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert "argument --strategy: invalid choice: 'cyclic' (choose from" in error and "'gradual'" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("strategy", "blocks", "searches"),
    [
        ("surgical", ["stage2"], [False]),
        ("alternate", ["stage1", "stage2"], [False] * 3),  # each phase is wrapped anew, its blocks alone trainable
        ("gradual", ["stage1", "stage2"], [False] * 3),
        ("lp-ft", ["stage1"], [False, False]),
        ("surgical", ["embedder"], [True]),  # the stem: where ViT-like models keep a mask_token forward never uses
        ("gradual", ["embedder", "stage2"], [False, False, True]),
        ("full", [], [True]),
    ],
)
def test_ddp_searches_for_unused_parameters_only_where_a_trained_one_can_go_unreached(
    strategy: str, blocks: list[str], searches: list[bool]
) -> None:
    from surgical_peft.blocks import list_blocks
    from surgical_peft.training.accelerator import may_leave_parameters_unused

    block_map = list_blocks(build_model("resnet-basic"))
    phases = FineTuneArguments(strategy=strategy, blocks=blocks, epochs=3).phases()
    assert [may_leave_parameters_unused(phase.blocks, block_map) for phase in phases] == searches


def test_another_peft_methods_adapter_trains_whole_and_refuses_block_schedules() -> None:
    # A LoRA PeftModel (as the study trains one) goes through the loop as a whole: strategy 'full' trains its
    # adapter; a strategy that trains some blocks at a time cannot, and says so before training.
    from peft import LoraConfig, get_peft_model

    from surgical_peft.errors import InputError

    lora = get_peft_model(
        build_model("resnet-basic"), LoraConfig(target_modules=["convolution"], init_lora_weights=False)
    )
    before = {name: p.detach().clone() for name, p in lora.named_parameters() if p.requires_grad}
    fine_tune(lora, DATA, None, FineTuneArguments(strategy="full", epochs=1, batch_size=4, progress=False))
    trained = dict(lora.named_parameters())
    assert before and all(not torch.equal(trained[name], tensor) for name, tensor in before.items())
    other = get_peft_model(build_model("resnet-basic"), LoraConfig(target_modules=["convolution"]))
    with pytest.raises(InputError, match=r"strategy='lp-ft' trains some blocks at a time.*LoraModel"):
        fine_tune(other, DATA, None, FineTuneArguments(strategy="lp-ft", epochs=2, batch_size=4, progress=False))
