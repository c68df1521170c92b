"""two-layer: the idealised two-layer setting of Lee et al. (ICLR 2023, section 4), reproduced in pure torch.

A two-layer network f(x) = v^T sigma(B x), B a k x d first layer, v a k-vector read-out, sigma the identity (the
linear case) or ReLU, is pretrained on a source and then fine-tuned on n labelled target examples in one of three
ways: the first layer only (B), the last layer only (v), or both (full fine-tuning). Two shifts:

- input-level: the source's inputs span only d - m of the d input directions; the target's inputs span all d (m new
  directions) and are labelled by the same teacher. The pretrained first layer is right on the source's span and
  wrong on the new directions, so the fix is in the first layer;
- label-level: the target has the source's inputs and features but a new read-out, y = v_tgt^T sigma(B* x): the fix
  is in the last layer.

Assumptions (the idealised setting; see benchmarks/results/two_layer.md for where it departs from the paper):

- a teacher f*(x) = v*^T sigma(B* x) labels the source, without noise; B*'s rows are Gaussian with norm about 1 and
  the network is balanced (|v*_j| = ||B*_j||), as gradient descent from a small initialisation leaves a linear
  network;
- pretraining is idealised rather than run: the pretrained model is (B_src, v*), where B_src equals B* on the
  source's span and keeps a small random initialisation (scale `init_scale`) on the m new directions, which source
  gradients never reach;
- fine-tuning is full-batch gradient descent on the squared loss from the pretrained weights, step size 0.5 over the
  largest eigenvalue of the Gauss-Newton matrix at the start, `steps` steps: its implicit bias is what separates the
  methods when n < d;
- target test error: mean squared error on `test_n` fresh target examples divided by the mean squared label
  (1.0 = predicting 0).

Writes `<output-dir>/two_layer.{md,csv}` (tables over n, mean +- std over seeds; one CSV line per run).
Deterministic: every draw comes from a generator seeded by the seed.

Usage:
    python benchmarks/two_layer.py            # the tables in benchmarks/results/two_layer.md: under a minute
    python benchmarks/two_layer.py --quick    # a smoke run: seconds
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

METHODS = {"first-layer": ("B",), "last-layer": ("v",), "full": ("B", "v")}
SHIFTS = ("input-level", "label-level")
ACTIVATIONS = ("linear", "relu")


@dataclass(frozen=True)
class Settings:
    """The sizes of the setting and of the experiment."""

    input_dim: int = 32
    new_directions: int = 4
    hidden: int = 8
    init_scale: float = 0.1
    steps: int = 3000
    test_n: int = 4000
    sizes: tuple[int, ...] = (4, 8, 16, 32, 64, 128)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    activations: tuple[str, ...] = ACTIVATIONS
    feature_scales: tuple[float, ...] = (1.0, 3.0)


@dataclass
class Task:
    """Every seed's pretrained model, test set and training sets for one shift, stacked on a leading seed axis."""

    weights: dict[str, torch.Tensor]  # the pretrained "B" (seeds, k, d) and "v" (seeds, k)
    test: tuple[torch.Tensor, torch.Tensor]  # inputs (seeds, test_n, d), labels (seeds, test_n)
    train: dict[int, tuple[torch.Tensor, torch.Tensor]]  # n -> inputs (seeds, n, d), labels (seeds, n)


def _sigma(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, torch.Tensor]:
    """sigma(h) and sigma'(h)."""
    if activation == "linear":
        return h, torch.ones_like(h)
    return torch.relu(h), (h > 0).to(h.dtype)


def forward(weights: dict[str, torch.Tensor], x: torch.Tensor, activation: str) -> torch.Tensor:
    """f(x) = v^T sigma(B x) per seed: x (seeds, n, d) -> (seeds, n)."""
    features, _ = _sigma(torch.einsum("snd,skd->snk", x, weights["B"]), activation)
    return torch.einsum("snk,sk->sn", features, weights["v"])


def _draw(shift: str, seed: int, activation: str, scale: float, settings: Settings) -> list[torch.Tensor]:
    """One seed's pretrained B and v, test inputs and labels, then each training set's inputs and labels."""
    generator = torch.Generator().manual_seed(seed)
    d, k, m = settings.input_dim, settings.hidden, settings.new_directions
    teacher_b = scale * torch.randn(k, d, generator=generator) / d**0.5  # rows of norm about `scale`
    teacher_v = torch.randint(0, 2, (k,), generator=generator).mul(2).sub(1) / scale  # output of scale about 1
    pretrained_b = teacher_b.clone()
    pretrained_b[:, d - m :] = settings.init_scale * scale * torch.randn(k, m, generator=generator) / d**0.5
    input_mask = torch.ones(d)
    if shift == "input-level":  # new input directions, the same labelling
        target_v = teacher_v
    else:  # the source's inputs, a new read-out of the same features
        input_mask[d - m :] = 0
        target_v = torch.randn(k, generator=generator) / scale
    drawn = [pretrained_b, teacher_v.clone()]
    for n in (settings.test_n, *settings.sizes):
        x = torch.randn(1, n, d, generator=generator) * input_mask
        drawn += [x[0], forward({"B": teacher_b[None], "v": target_v[None]}, x, activation)[0]]
    return drawn


def make_task(shift: str, activation: str, scale: float, settings: Settings) -> Task:
    """The idealised pretrained models and targets of `shift`, one per seed (see the module docstring)."""
    per_seed = [_draw(shift, seed, activation, scale, settings) for seed in settings.seeds]
    stacked = [torch.stack(tensors) for tensors in zip(*per_seed, strict=True)]
    train = {n: (stacked[4 + 2 * i], stacked[5 + 2 * i]) for i, n in enumerate(settings.sizes)}
    return Task({"B": stacked[0], "v": stacked[1]}, (stacked[2], stacked[3]), train)


def _jacobian(weights: dict[str, torch.Tensor], trained: Sequence[str], x: torch.Tensor, activation: str):
    """Per seed, the Jacobian of the predictions with respect to the trained tensors: (seeds, n, parameters)."""
    features, slopes = _sigma(torch.einsum("snd,skd->snk", x, weights["B"]), activation)
    parts = {
        "B": (weights["v"][:, None, :, None] * slopes[..., None] * x[:, :, None, :]).flatten(2),
        "v": features,
    }
    return torch.cat([parts[name] for name in trained], dim=2)


def fine_tune(
    pretrained: dict[str, torch.Tensor],
    trained: Sequence[str],
    x: torch.Tensor,
    y: torch.Tensor,
    activation: str,
    steps: int,
) -> dict[str, torch.Tensor]:
    """Full-batch gradient descent on the squared loss over the tensors named in `trained`, from `pretrained`, every
    seed at once; step size 0.5 over the largest eigenvalue of each seed's Gauss-Newton matrix J^T J / n at first."""
    weights = {name: tensor.clone() for name, tensor in pretrained.items()}
    n = x.shape[1]
    rates = 0.5 * n / torch.linalg.matrix_norm(_jacobian(weights, trained, x, activation), ord=2) ** 2
    rates = {"B": rates.view(-1, 1, 1) / n, "v": rates.view(-1, 1) / n}
    for _ in range(steps):
        features, slopes = _sigma(torch.bmm(x, weights["B"].transpose(1, 2)), activation)  # (seeds, n, k)
        residual = torch.bmm(features, weights["v"][..., None]) - y[..., None]  # (seeds, n, 1)
        if "B" in trained:
            update = torch.bmm((residual * slopes * weights["v"][:, None, :]).transpose(1, 2), x)
            weights["B"] = weights["B"] - rates["B"] * update
        if "v" in trained:
            weights["v"] = weights["v"] - rates["v"] * torch.bmm(features.transpose(1, 2), residual)[..., 0]
    return weights


def test_error(weights: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, activation: str) -> torch.Tensor:
    """Per seed, the mean squared error over the mean squared label (1.0: as bad as predicting 0)."""
    return (forward(weights, x, activation) - y).pow(2).mean(1) / y.pow(2).mean(1)


def run(settings: Settings) -> list[dict[str, object]]:
    """One row per shift, activation, feature scale, seed, number of target examples and method (with the untouched
    pretrained model)."""
    rows = []
    for shift in SHIFTS:
        for activation in settings.activations:
            for scale in settings.feature_scales:
                task = make_task(shift, activation, scale, settings)
                for n, (x, y) in task.train.items():
                    errors = {"pretrained": test_error(task.weights, *task.test, activation)}
                    for method, trained in METHODS.items():
                        tuned = fine_tune(task.weights, trained, x, y, activation, settings.steps)
                        errors[method] = test_error(tuned, *task.test, activation)
                    key = {"shift": shift, "activation": activation, "feature_scale": scale, "n": n}
                    rows += [
                        {**key, "seed": seed, "method": method, "test_error": float(error[i])}
                        for method, error in errors.items()
                        for i, seed in enumerate(settings.seeds)
                    ]
    return rows


def _cell(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.3f}"


def _errors(rows: list[dict[str, object]], setting: dict[str, object]) -> dict[tuple[str, int], list[float]]:
    """(method, n) -> the test errors over seeds (in seed order) of the rows matching `setting`."""
    errors: dict[tuple[str, int], list[float]] = {}
    for row in rows:
        if all(row[key] == value for key, value in setting.items()):
            errors.setdefault((row["method"], row["n"]), []).append(row["test_error"])
    return errors


def _winners(errors: dict[tuple[str, int], list[float]], n: int) -> list[str]:
    """The fine-tuning methods with the lowest mean error at `n`, with those within 0.0005 of it (equal as shown)."""
    means = {method: statistics.mean(errors[method, n]) for method in METHODS}
    return [method for method, mean in means.items() if mean <= min(means.values()) + 5e-4]


def table(errors: dict[tuple[str, int], list[float]], sizes: Sequence[int]) -> list[str]:
    """A markdown table: one row per method, one column per number of target examples, the best method in bold; then
    first-layer and last-layer minus full fine-tuning, paired by seed."""
    lines = ["| method | " + " | ".join(f"n = {n}" for n in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method in ["pretrained", *METHODS]:
        cells = [_cell(errors[method, n]) for n in sizes]
        cells = [f"**{c}**" if method in _winners(errors, n) else c for c, n in zip(cells, sizes, strict=True)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    for method in ("first-layer", "last-layer"):
        differences = [
            _cell([a - b for a, b in zip(errors[method, n], errors["full", n], strict=True)]) for n in sizes
        ]
        lines.append(f"| {method} - full (paired) | " + " | ".join(differences) + " |")
    return lines


_SETTING = """\
## The setting, and where it departs from the paper

f(x) = v^T sigma(B x) with B a k x d first layer and v a k-vector; the teacher f*(x) = v*^T sigma(B* x) labels the
source without noise. The source's inputs are standard Gaussian on d - m input directions (0 on the other m); the
pretrained model is idealised: B_src = B* on the source's span and a small random initialisation (`init_scale` of the
teacher's scale) on the m new directions, v_src = v*, i.e. what gradient descent from a small initialisation reaches
when it recovers the teacher on the source (source gradients never reach the new directions). `feature_scale` is the
norm of B*'s rows, with v* = ±1/feature_scale so that the function does not depend on it: it changes only how the
parameters split the scale between the layers, which is what full fine-tuning's gradient descent is sensitive to.

- input-level shift: target inputs are standard Gaussian on all d directions, labelled by f*. The error of the
  pretrained model lies in the m new directions, i.e. in the first layer.
- label-level shift: target inputs are the source's, labelled by v_tgt^T sigma(B* x) with a new read-out v_tgt ~
  N(0, 1/feature_scale^2): the error lies in the last layer.
- fine-tuning: full-batch gradient descent on the squared loss from the pretrained weights (`steps` steps, step size
  0.5 over the largest eigenvalue of the Gauss-Newton matrix at the start), over B (first-layer), v (last-layer) or
  both (full). Test error: mean squared error on `test_n` fresh target examples over the mean squared label.

What to read in the tables: with few target examples (n below d = input_dim), each method's gradient descent
reaches the interpolating solution nearest its start in its own geometry. First-layer tuning corrects the linear
map isotropically in input space; last-layer tuning can only re-weight the pretrained features; full fine-tuning
mixes both, weighted by the scales of the two layers (the read-out's gradient grows with the features' norm, the first
layer's with the read-out's). So for the input-level shift first-layer tuning should win and last-layer tuning
should fail at every n (the new directions are not among its features), and full fine-tuning should approach
first-layer tuning when the read-out dominates (feature_scale=1) and fall behind when the features dominate
(feature_scale=3); for the label-level shift last-layer tuning should win from n = hidden on. Once n reaches d,
first-layer and full fine-tuning interpolate the whole linear map and every method that can fit the target ties.

Departures from Lee et al. (2023), section 4:

- the setting is reconstructed from the paper's description of its idealised two-layer analysis (an input-level
  shift as input directions the source never shows, an output-level shift as a new read-out of the same features),
  not from its proofs, which are stated about the fine-tuned solutions rather than about gradient descent runs; here
  gradient descent with a fixed budget is run, so the implicit bias of each method decides the comparison when
  n < d, and runs with n close to d are not fully converged;
- pretraining is not run: the pretrained weights are constructed under the assumption above;
- the comparison of full and first-layer tuning depends on how the pretrained parameters split the scale between
  the layers (feature_scale), which the function alone does not fix;
- the ReLU tables use the same construction and are an illustration beyond the linear case;
- one scalar output, Gaussian inputs, no label noise, dimensions far below a real network's.
"""


def markdown(rows: list[dict[str, object]], settings: Settings, seconds: float) -> str:
    """The report: settings, the tables, which method wins where, and the setting's assumptions."""
    lines = [
        "# two-layer: the paper's idealised two-layer setting",
        "",
        f"Produced by `python benchmarks/two_layer.py` in {seconds:.0f} s (one thread). Settings: "
        + ", ".join(f"{key}={value}" for key, value in asdict(settings).items())
        + ". Target test error (mean squared error over mean squared label; lower is better), mean ± std over seeds "
        + ", ".join(map(str, settings.seeds))
        + "; the best fine-tuning method per column in bold (with any within 0.0005 of it).",
        "",
        "## Which fine-tuning wins, by number of target examples",
        "",
    ]
    sections = []
    for shift in SHIFTS:
        for activation in settings.activations:
            for scale in settings.feature_scales:
                setting = {"shift": shift, "activation": activation, "feature_scale": scale}
                errors = _errors(rows, setting)
                title = f"two-layer, {shift} shift, {activation}, feature_scale={scale:g}"
                wins = ", ".join(f"n={n}: {' = '.join(_winners(errors, n))}" for n in settings.sizes)
                lines.append(f"- {title}: {wins}")
                sections += ["", f"## {title}", "", *table(errors, settings.sizes)]
    return "\n".join([*lines, *sections, "", _SETTING])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See the module docstring.")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 seeds, 3 sizes, 300 steps")
    parser.add_argument("--output-dir", default=str(Path(__file__).parent / "results"), help="where results go")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    settings = Settings()
    if args.quick:
        settings = replace(settings, steps=300, test_n=500, sizes=(4, 16, 64), seeds=(0, 1))
    start = time.perf_counter()
    rows = run(settings)
    seconds = time.perf_counter() - start
    output = Path(args.output_dir)
    output.mkdir(parents=True, exist_ok=True)
    stem = output / ("two_layer-quick" if args.quick else "two_layer")
    with stem.with_suffix(".csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".md").write_text(markdown(rows, settings, seconds))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
