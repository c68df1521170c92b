"""Privacy accounting for full-batch NoisyGD: exact Gaussian-DP composition (Dong, Roth & Su, 2022).

One full-batch step releases the summed per-example gradients, each clipped to norm `C`, plus Gaussian noise of
standard deviation `sigma * C`: a Gaussian mechanism of sensitivity `C`, which is `(1 / sigma)`-GDP under adding or
removing one example. `T` such steps compose exactly (adaptively) to `mu`-GDP with `mu = sqrt(T) / sigma`, and
`mu`-GDP is `(epsilon, delta(epsilon))`-DP for every `epsilon >= 0` with

    delta(epsilon) = Phi(-epsilon / mu + mu / 2) - e^epsilon * Phi(-epsilon / mu - mu / 2).

This is tight (no looser bound on the way), so it gives a smaller epsilon than Renyi-DP accounting of the same
steps; `tests/test_privacy.py` checks it against Opacus's RDP and PRV accountants at sample rate 1.

Example:
    >>> sigma = noise_multiplier(epsilon=1.0, delta=1e-5, steps=100)
    >>> round(sigma, 2), spent_epsilon(sigma, steps=100, delta=1e-5) <= 1.0
    (37.31, True)
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ..errors import InputError

__all__ = ["ACCOUNTANT", "check_delta", "check_epsilon", "gdp_delta", "noise_multiplier", "spent_epsilon"]

ACCOUNTANT = "gdp"
"""The accountant's name in the privacy record: exact Gaussian-DP composition of full-batch steps."""

_BISECTIONS = 200


_MAX_EPSILON = 1e100  # far beyond any meaningful budget; near float's range the accounting overflows


def check_epsilon(epsilon: float) -> float:
    """`epsilon`, if it is a number in (0, 1e100]; an `InputError` naming the valid range otherwise.

    Example:
        >>> check_epsilon(8)
        8.0
        >>> check_epsilon(float("inf"))
        Traceback (most recent call last):
        ...
        surgical_peft.errors.InputError: epsilon must be a number in (0, 1e+100], got inf.
    """
    if not (isinstance(epsilon, int | float) and 0 < epsilon <= _MAX_EPSILON):
        raise InputError(f"epsilon must be a number in (0, {_MAX_EPSILON:g}], got {epsilon!r}.")
    return float(epsilon)


def check_delta(delta: float, n: int | None = None) -> float:
    """`delta`, if it lies in (0, 1) and, given the number of private examples `n`, below 1/n (a larger delta allows
    releasing one example outright); an `InputError` naming the valid range otherwise.

    Example:
        >>> try:
        ...     check_delta(1e-3, n=2000)
        ... except InputError as error:
        ...     print(error)
        delta must be in (0, 1/n) = (0, 0.0005) for n = 2000 private examples, got 0.001.
    """
    upper, where = (1.0, "(0, 1)") if n is None else (1.0 / n, f"(0, 1/n) = (0, {1.0 / n:.4g})")
    if not (isinstance(delta, int | float) and 0 < delta < upper):
        private = "" if n is None else f" for n = {n} private examples"
        raise InputError(f"delta must be in {where}{private}, got {delta!r}.")
    return float(delta)


def _phi(x: float) -> float:
    """The standard normal CDF."""
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gdp_delta(epsilon: float, mu: float) -> float:
    """The smallest `delta` for which `mu`-GDP is `(epsilon, delta)`-DP.

    Example:
        >>> round(gdp_delta(1.0, 1.0), 4)
        0.1269
    """
    tail = _phi(-epsilon / mu - mu / 2)
    return _phi(-epsilon / mu + mu / 2) - (math.exp(epsilon) * tail if tail > 0 else 0.0)


def _bisect(function: Callable[[float], bool], low: float, high: float) -> float:
    """The boundary of a monotone predicate, `function(low)` false and `function(high)` true, from above."""
    for _ in range(_BISECTIONS):
        middle = (low + high) / 2
        if function(middle):
            high = middle
        else:
            low = middle
    return high


def spent_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """The epsilon that `steps` full-batch steps with noise `noise_multiplier` (std / clipping norm) spend at
    `delta`: the smallest epsilon with `gdp_delta(epsilon, sqrt(steps) / noise_multiplier) <= delta`.

    Example:
        >>> round(spent_epsilon(10.0, steps=100, delta=1e-5), 3)
        4.377
    """
    if noise_multiplier <= 0:
        return math.inf
    mu = math.sqrt(steps) / noise_multiplier
    high = 1.0
    while gdp_delta(high, mu) > delta:
        high *= 2
    return _bisect(lambda epsilon: gdp_delta(epsilon, mu) <= delta, 0.0, high)


def noise_multiplier(epsilon: float, delta: float, steps: int) -> float:
    """The smallest noise multiplier (noise std / clipping norm) for which `steps` full-batch steps are
    `(epsilon, delta)`-DP; the epsilon it spends never exceeds `epsilon`.

    Raises:
        InputError: for epsilon <= 0 or not finite, or delta outside (0, 1).

    Example:
        >>> sigma = noise_multiplier(epsilon=2.0, delta=1e-5, steps=100)
        >>> round(sigma, 2), spent_epsilon(sigma, steps=100, delta=1e-5) <= 2.0
        (19.94, True)
        >>> round(noise_multiplier(epsilon=2.0, delta=1e-5, steps=400) / sigma, 2)  # 4x the steps: 2x the noise
        2.0
    """
    epsilon, delta = check_epsilon(epsilon), check_delta(delta)
    high = 1.0  # mu of the whole run: delta(epsilon) grows with mu
    while gdp_delta(epsilon, high) < delta:
        high *= 2
    mu = _bisect(lambda m: gdp_delta(epsilon, m) > delta, 0.0, high)  # the first mu above delta: step below it
    sigma = math.sqrt(steps) / mu
    while spent_epsilon(sigma, steps, delta) > epsilon:  # rounding: more noise until the budget holds
        sigma = math.nextafter(sigma, math.inf) * (1 + 1e-12)
    return sigma
