"""Training strategies, one module each (Lee et al. 2023; Kumar et al. 2022): what each phase of a run trains.

- `surgical`: tune the chosen blocks, freeze the rest;
- `full`: tune every block (the adapter then holds deltas for the whole model);
- `linear-probe`: tune the head only;
- `lp-ft`: linear-probe the head first, then fine-tune the chosen blocks together with the head;
- `alternate`: the chosen blocks one at a time, switching every epoch (one phase per epoch) or every k steps;
- `gradual`: gradual unfreezing (Howard & Ruder 2018): the head, then one more chosen block per epoch towards the
  input.
- `self-train`: a surgical teacher labels unlabelled target images, an ensemble of adapters keeps the confident
  labels, and a student trains on the labelled plus the kept images;
- `dp-linear-probe`: the head by NoisyGD on frozen features, differentially private (`surgical_peft.privacy`);
- `dp-surgical`: the chosen blocks by DP-SGD with Opacus (no BatchNorm blocks), differentially private.

A strategy is an object with a `description` and `phases(args) -> list[Phase]` (see `_base.py`); one that also has
`run(...)` runs itself instead of the loop's epochs. `STRATEGIES` finds them by module name.

Example:
    >>> STRATEGIES.names  # doctest: +NORMALIZE_WHITESPACE
    ('alternate', 'dp-linear-probe', 'dp-surgical', 'full', 'gradual', 'linear-probe', 'lp-ft', 'self-train',
     'surgical')
"""

from ...registry import Registry

__all__ = ["STRATEGIES"]

STRATEGIES: Registry = Registry(__name__, __path__, kind="strategy", attribute="STRATEGY")
"""The training strategies, by name."""
