"""Criteria that rank a model's blocks on labelled target data, one module each (Lee et al., ICLR 2023, section 5).

- `rgn` (Auto-RGN): the mean over a block's tensors of the relative gradient norm ||g|| / ||w|| of the target loss.
  Every layer counts once, whatever its size, so blocks of very different sizes (a ResNet stem and its last stage
  differ by 100x) stay comparable; the block-level ratio of norms would be dominated by the largest tensors.
- `snr` (Auto-SNR): the mean over a block's tensors of the signal-to-noise ratio of per-example gradients (squared
  mean over examples divided by the variance over examples, averaged over the tensor's entries). Gradients that agree
  across examples score high; noise scores about 1 / number of examples.
- `sweep`: fine-tune a copy of the model on each candidate block in turn on part of the target data and score it by
  accuracy on the held-out rest. Slow but direct; the ranking says how slow.
- `greedy` (SubTuning, Kaplun et al. 2023): grow a block subset, not necessarily contiguous, adding the block that most
  improves held-out accuracy until no addition gains more than a threshold; `BlockRanking.chosen` is the subset.

A criterion is an object with a `description` and `rank(model, dataloader, candidates, options)` returning a
`surgical_peft.selection.BlockRanking` (see `_base.py`); `CRITERIA` finds them by module name.

Example:
    >>> CRITERIA.names
    ('greedy', 'rgn', 'snr', 'sweep')
"""

from ..registry import Registry

__all__ = ["CRITERIA"]

CRITERIA: Registry = Registry(__name__, __path__, kind="criterion", attribute="CRITERION")
"""The block-ranking criteria, by name."""
