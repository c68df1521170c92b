"""Differentially private linear probing (`surgical_peft.privacy`, `--strategy dp-linear-probe`): the accountant
against Opacus's, the clipping bound, the head folded back into the model, the privacy record, and bad input."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import pytest
import torch
from conftest import build_model
from huggingface_hub import ModelCard
from peft import PeftModel

from surgical_peft.cli import main
from surgical_peft.cli.recipe import add_training_arguments, run_training
from surgical_peft.errors import InputError, TrainingError
from surgical_peft.privacy import (
    FeatureTransform,
    PrivacyArguments,
    check_delta,
    head_inputs,
    noise_multiplier,
    noisy_gd,
    private_linear_probe,
    spent_epsilon,
)
from surgical_peft.training import FineTuneArguments, fine_tune

EPSILONS = [0.5, 1.0, 2.0, 4.0, 8.0]
TINY = ["--train-n", "30", "--eval-n", "20", "--no-progress"]
RECORD = {"epsilon", "delta", "accountant", "mechanism", "noise_multiplier", "steps", "sample_rate", "clipping_norm"}


def examples(n: int, seed: int = 0, size: int = 16) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"pixel_values": torch.randn(3, size, size, generator=generator), "labels": i % 3} for i in range(n)]


# ------------------------------------------------------------------------------------------------- accounting
@pytest.mark.parametrize("steps", [1, 100, 1000])
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_the_spent_epsilon_never_exceeds_the_requested_one(epsilon: float, steps: int) -> None:
    sigma = noise_multiplier(epsilon, 1e-5, steps)
    spent = spent_epsilon(sigma, steps, 1e-5)
    assert spent <= epsilon
    assert spent > epsilon * (1 - 1e-6)  # and the noise is not larger than it needs to be
    assert spent_epsilon(sigma * 0.99, steps, 1e-5) > epsilon


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")  # RDP's alphas at large sigma
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # PRV at sample rate 1
@pytest.mark.parametrize("epsilon", EPSILONS)
def test_the_accountant_agrees_with_opacus(epsilon: float) -> None:
    """Same noise, steps and sample rate 1: exact GDP is below Opacus's RDP bound and matches its PRV accountant
    (whose estimate is an upper bound within its eps_error of 0.01)."""
    accountants = pytest.importorskip("opacus.accountants")
    from opacus.accountants.utils import get_noise_multiplier

    steps, delta = 100, 1e-5
    sigma = noise_multiplier(epsilon, delta, steps)
    spent = spent_epsilon(sigma, steps, delta)
    rdp, prv = accountants.RDPAccountant(), accountants.PRVAccountant()
    for accountant in (rdp, prv):
        accountant.history = [(sigma, 1.0, steps)]
    rdp_epsilon = rdp.get_epsilon(delta)
    assert spent <= rdp_epsilon < 1.2 * spent
    assert abs(prv.get_epsilon(delta) - spent) <= 0.011 + 1e-3 * spent
    opacus_sigma = get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=steps, accountant="prv"
    )
    assert sigma <= opacus_sigma <= 1.05 * sigma  # Opacus's search stops within its epsilon tolerance, from above


@pytest.mark.parametrize("epsilon", [0.0, -1.0, math.inf, math.nan, 1e308])  # 1e308 overflowed the accounting
def test_a_bad_epsilon_is_refused(epsilon: float) -> None:
    with pytest.raises(InputError, match=r"epsilon must be a number in \(0, 1e\+100\]"):
        PrivacyArguments(epsilon=epsilon)


@pytest.mark.parametrize(("delta", "n"), [(0.0, None), (1.0, None), (-1e-5, None), (0.01, 100), (0.02, 100)])
def test_a_bad_delta_is_refused(delta: float, n: int | None) -> None:
    with pytest.raises(InputError, match=r"delta must be in \(0, 1"):
        check_delta(delta, n)


# ---------------------------------------------------------------------------------------------------- NoisyGD
@pytest.mark.parametrize("fit_bias", [True, False])
def test_one_example_moves_the_summed_gradient_by_at_most_the_clipping_norm(fit_bias: bool) -> None:
    """The sensitivity the noise is calibrated to: removing one example changes the clipped sum by at most C."""
    generator = torch.Generator().manual_seed(0)
    features, labels = 10 * torch.randn(50, 6, generator=generator), torch.randint(0, 4, (50,), generator=generator)

    def summed_gradient(n: int) -> torch.Tensor:  # one step from zero without noise: theta_1 = -lr * sum / n
        weight, bias = noisy_gd(features[:n], labels[:n], 4, steps=1, learning_rate=1.0, clipping_norm=0.5,
                                noise_multiplier=0.0, fit_bias=fit_bias)  # fmt: skip
        return -n * torch.cat([weight, bias[:, None]], dim=1) if fit_bias else -n * weight

    difference = (summed_gradient(50) - summed_gradient(49)).norm()
    assert 0.5 - 1e-5 <= difference <= 0.5 + 1e-5  # that example's gradient (norm about 20) is clipped to exactly C


def test_noise_makes_the_probe_random_and_no_noise_makes_it_deterministic() -> None:
    generator = torch.Generator().manual_seed(0)
    features, labels = torch.randn(40, 5, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    settings = {"steps": 5, "learning_rate": 1.0, "clipping_norm": 1.0}
    quiet = [noisy_gd(features, labels, 3, noise_multiplier=0.0, **settings)[0] for _ in range(2)]
    noisy = [noisy_gd(features, labels, 3, noise_multiplier=1.0, **settings)[0] for _ in range(2)]
    assert torch.equal(*quiet) and not torch.equal(*noisy)
    with pytest.raises(ValueError, match="finite clipping_norm"):
        noisy_gd(features, labels, 3, steps=1, learning_rate=1.0, clipping_norm=math.inf, noise_multiplier=1.0)


# ---------------------------------------------------------------------------------------- features and folding
@pytest.mark.parametrize(("normalise", "pca_dim"), [(False, None), (True, None), (False, 4), (True, 4)])
def test_the_probe_folds_into_a_head_that_predicts_the_same(normalise: bool, pca_dim: int | None) -> None:
    generator = torch.Generator().manual_seed(0)
    public, private = 3 + torch.randn(30, 8, generator=generator), 3 + torch.randn(20, 8, generator=generator)
    transform = FeatureTransform.fit(public, normalise=normalise, pca_dim=pca_dim)
    z = transform(private)
    assert z.shape == (20, pca_dim or 8)
    if normalise:
        assert z.norm(dim=1).max() <= 1 + 1e-6  # the clipping bound follows from the normalisation
    weight = torch.randn(3, z.shape[1], generator=generator)
    bias = None if normalise else torch.randn(3, generator=generator)
    probe = z @ weight.T + (0 if bias is None else bias)
    head_weight, head_bias = transform.fold(weight, bias)
    head = private @ head_weight.T + (0 if head_bias is None else head_bias)
    assert torch.equal(probe.argmax(1), head.argmax(1))
    if not normalise:
        torch.testing.assert_close(head, probe)


def test_the_pca_basis_comes_from_the_public_data_only() -> None:
    public = torch.zeros(30, 8)
    public[:, 2] = torch.linspace(-1, 1, 30)  # all the public variance lies along axis 2
    basis = FeatureTransform.fit(public, normalise=False, pca_dim=1).basis
    torch.testing.assert_close(basis.abs().squeeze(), torch.eye(8)[2])


@pytest.mark.parametrize(
    ("pca_dim", "public_n", "message"),
    [
        (17, 40, r"pca_dim must be between 1 and 16 \(the feature size is 16"),
        (12, 10, r"pca_dim must be between 1 and 10 .*the public data has 10 examples"),
        (4, None, "pca_dim needs a public dataset"),
    ],
)
def test_a_bad_pca_dim_is_refused_before_the_backbone_runs(pca_dim: int, public_n: int | None, message: str) -> None:
    model = build_model("resnet-basic")  # 16 features into the head
    public = examples(public_n) if public_n else None
    privacy = PrivacyArguments(epsilon=1.0, delta=1e-3, pca_dim=pca_dim, public_dataset=public)
    head = model.classifier[1].weight.detach().clone()
    with pytest.raises(InputError, match=message):
        private_linear_probe(model, examples(20), privacy)
    assert torch.equal(model.classifier[1].weight, head)


# -------------------------------------------------------------------------------------------- the strategy
def test_dp_linear_probe_trains_the_head_as_a_surgical_adapter(tmp_path: Path) -> None:
    model = build_model("resnet-basic")
    privacy = PrivacyArguments(epsilon=2.0, delta=1e-3, feature_norm=True, pca_dim=8, public_dataset=examples(30, 1),
                               steps=20, noise_seed=0)  # fmt: skip
    args = FineTuneArguments(strategy="dp-linear-probe", batch_size=16, progress=False, privacy=privacy)
    result = fine_tune(model, examples(40), examples(12, 2), args)

    assert set(result.privacy) == RECORD
    assert result.privacy["epsilon"] <= 2.0 and result.privacy["mechanism"] == "NoisyGD"
    assert result.privacy["sample_rate"] == 1.0 and result.privacy["steps"] == 20
    assert set(result.metrics) == {"eval_accuracy"}  # no training loss: it would be an unaccounted release
    assert result.model.peft_config["default"].blocks == ["head"]
    base = result.model.get_base_model()
    assert torch.count_nonzero(base.classifier[1].bias) == 0  # normalised features: a bias-free probe

    result.model.save_pretrained(tmp_path)
    fresh = PeftModel.from_pretrained(build_model("resnet-basic"), tmp_path)
    pixels = torch.stack([example["pixel_values"] for example in examples(5, 3)])
    with torch.no_grad():
        torch.testing.assert_close(fresh(pixel_values=pixels).logits, result.model.eval()(pixel_values=pixels).logits)
    features, _ = head_inputs(base, examples(5, 3))
    assert features.shape == (5, 16)


def test_the_same_seed_gives_the_same_probe_and_no_seed_a_fresh_noise() -> None:
    def head(seed: int | None) -> torch.Tensor:
        model = build_model("resnet-basic")
        private_linear_probe(model, examples(20), PrivacyArguments(epsilon=1.0, delta=1e-3, steps=5, noise_seed=seed))
        return model.classifier[1].weight.detach().clone()

    assert torch.equal(head(3), head(3))
    assert not torch.equal(head(None), head(None))


# -------------------------------------------------------------------------------------------- command line
def parse(*argv: str) -> argparse.Namespace:
    return add_training_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_the_command_line_records_the_privacy_spent(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    argv = ["--model", tiny_model, "--strategy", "dp-linear-probe", "--epsilon", "1", "--delta", "1e-3",
            "--feature-norm", "--pca-dim", "8", "--dp-steps", "30", *TINY, "--output-dir", str(output)]  # fmt: skip
    summary = run_training(parse(*argv))
    assert "into a source half (898) and a target half (899) because --pca-dim fits its basis on the source half" in (
        capsys.readouterr().out
    )

    assert sorted(p.name for p in output.iterdir()) == ["adapter", "metrics.json", "run_args.json"]
    privacy = json.loads((output / "metrics.json").read_text())["privacy"]
    assert set(privacy) == RECORD and privacy == summary["privacy"]
    assert privacy["epsilon"] <= 1.0 and privacy["delta"] == 1e-3 and privacy["steps"] == 30
    card = ModelCard.load(output / "adapter" / "README.md").text
    assert "NoisyGD" in card and f"{privacy['epsilon']:.3g}, 0.001)-DP" in card


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--epsilon", "0"], r"epsilon must be a number in \(0, 1e\+100\]"),
        (["--epsilon", "inf"], r"epsilon must be a number in \(0, 1e\+100\]"),
        (["--epsilon", "1", "--delta", "0.05"], r"delta must be in \(0, 1/n\) = \(0, 0.03333\) for n = 30 private"),
        (["--epsilon", "1", "--delta", "1"], r"delta must be in \(0, 1\)"),
        (["--epsilon", "1", "--pca-dim", "17"], "pca_dim must be between 1 and 16"),
        ([], "needs --epsilon"),
    ],
)
def test_bad_privacy_input_exits_with_status_2_and_writes_nothing(
    tiny_model: str, tmp_path: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    output = tmp_path / "run"
    command = ["train", "--model", tiny_model, "--strategy", "dp-linear-probe", *argv, *TINY, "--output-dir"]
    assert main([*command, str(output)]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and re.search(message, error), error
    assert not output.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "--epsilon applies to --strategy dp-linear-probe or dp-surgical, not to surgical."),
        (["--strategy", "dp-surgical", "--feature-norm"], "--feature-norm applies to --strategy dp-linear-probe, not "
         "to dp-surgical."),
    ],
)  # fmt: skip
def test_privacy_options_a_strategy_does_not_read_are_refused(
    argv: list[str], message: str, tiny_model: str, tmp_path: Path
) -> None:
    """The message names the strategies that read the option (from the strategy registry)."""
    with pytest.raises(InputError, match=re.escape(message)):
        run_training(parse("--model", tiny_model, "--epsilon", "1", *argv, *TINY, "--output-dir", str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_pca_without_public_data_is_refused(tiny_model: str, tmp_path: Path) -> None:
    argv = ["--model", tiny_model, "--dataset", str(tmp_path), "--strategy", "dp-linear-probe", "--epsilon", "1",
            "--pca-dim", "4", *TINY, "--output-dir", str(tmp_path / "x")]  # fmt: skip
    with pytest.raises(InputError, match="--pca-dim needs public data"):
        run_training(parse(*argv))


# ------------------------------------------------------------------------------------------------- dp-surgical
def test_dp_surgical_trains_one_block_by_dp_sgd_and_leaves_batchnorm_statistics_alone() -> None:
    """DP-SGD of the head of a ResNet: only the head moves, and no frozen BatchNorm statistic sees private data."""
    pytest.importorskip("opacus")
    model = build_model("resnet-basic")
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    privacy = PrivacyArguments(epsilon=2.0, delta=1e-3)
    args = FineTuneArguments(strategy="dp-surgical", blocks=["head"], epochs=2, batch_size=8, learning_rate=1e-2,
                             progress=False, privacy=privacy)  # fmt: skip
    result = fine_tune(model, examples(40), examples(12, 2), args)

    assert set(result.privacy) == RECORD and result.privacy["mechanism"] == "DP-SGD"
    assert result.privacy["epsilon"] <= 2.0 and result.privacy["sample_rate"] == pytest.approx(8 / 40)
    assert result.privacy["steps"] == 2 * 5
    after = result.model.get_base_model().state_dict()
    changed = {name for name, tensor in before.items() if not torch.equal(after[name], tensor)}
    assert changed == {"classifier.1.weight", "classifier.1.bias"}  # running_mean/var of every BatchNorm unchanged
    assert set(result.metrics) == {"eval_accuracy"}


def test_dp_surgical_stops_on_a_non_finite_loss() -> None:
    pytest.importorskip("opacus")
    args = FineTuneArguments(strategy="dp-surgical", blocks=["head"], epochs=2, batch_size=8, progress=False,
                             privacy=PrivacyArguments(epsilon=2.0, delta=1e-3))  # fmt: skip
    broken = [
        {**example, "pixel_values": torch.full_like(example["pixel_values"], math.nan)} for example in examples(40)
    ]
    with pytest.raises(TrainingError, match="Training stopped in dp-surgical epoch 1/2: the loss is not finite"):
        fine_tune(build_model("resnet-basic"), broken, None, args)


def test_dp_surgical_on_a_layernorm_block() -> None:
    pytest.importorskip("opacus")
    model = build_model("vit")
    args = FineTuneArguments(strategy="dp-surgical", blocks=["layer2"], epochs=1, batch_size=8, progress=False,
                             privacy=PrivacyArguments(epsilon=4.0, delta=1e-3))  # fmt: skip
    result = fine_tune(model, examples(24, size=32), None, args)
    assert result.privacy["epsilon"] <= 4.0
    assert result.model.peft_config["default"].blocks == ["layer2"]


def test_dp_surgical_refuses_a_batchnorm_block_before_training(tiny_model: str, tmp_path: Path) -> None:
    output = tmp_path / "run"
    argv = ["train", "--model", tiny_model, "--strategy", "dp-surgical", "--block", "stage1", "--epsilon", "1",
            *TINY, "--output-dir", str(output)]  # fmt: skip
    assert main(argv) == 2
    assert not output.exists()
    with pytest.raises(InputError, match=r"holds BatchNorm layers .*dp-linear-probe, or a LayerNorm block"):
        fine_tune(build_model("resnet-basic"), examples(20), None,
                  FineTuneArguments(strategy="dp-surgical", blocks=["stage1"], progress=False,
                                    privacy=PrivacyArguments(epsilon=1.0, delta=1e-3)))  # fmt: skip
