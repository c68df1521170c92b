"""Block selection: rank a model's blocks on target data (`rank_blocks`) and resolve `block="auto"`
(`select_blocks`); the criteria themselves are in `surgical_peft.criteria`.

Example:
    >>> from surgical_peft.selection import BlockRanking
    >>> BlockRanking("rgn", {"stage1": 0.2, "head": 0.5}, {"stage1": 1200, "head": 40}).best()
    ['head']
"""

from ..ranking import BlockRanking
from .rank import rank_blocks, select_blocks

__all__ = ["BlockRanking", "rank_blocks", "select_blocks"]
