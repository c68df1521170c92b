"""Experiments: image data (`data`), distribution shifts (`shifts`) and the paper's headline experiment (`demo`).

Example:
    >>> from surgical_peft.experiments import shifts
    >>> shifts.CORRUPTIONS[:2], list(shifts.SEVERITIES)
    (('gaussian_noise', 'shot_noise'), [1, 2, 3, 4, 5])
"""
