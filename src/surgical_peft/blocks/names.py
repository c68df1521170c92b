"""Block names with a meaning of their own, beside those a block map reads from a model (`stage1`, `layer12`, ...).

Example:
    >>> from surgical_peft.blocks.names import ALL, AUTO, HEAD
    >>> HEAD, ALL, AUTO
    ('head', 'all', 'auto')
"""

__all__ = ["ALL", "AUTO", "HEAD", "SPECIAL"]

HEAD = "head"
"""The task head: every parameterised module of the task model outside its backbone (e.g. `classifier`)."""

ALL = "all"
"""Every block: full fine-tuning, stored as deltas like any other adapter."""

AUTO = "auto"
"""The block(s) chosen from target data by a ranking criterion (`surgical_peft.select_blocks`)."""

SPECIAL = (ALL, AUTO)
"""Names that stand for a choice of blocks rather than one block of the model."""
