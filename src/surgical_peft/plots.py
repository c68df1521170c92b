"""Plots for experiments: a labelled bar chart (accuracy per tuned block, cost per method, ...).

Needs matplotlib, an optional extra: `pip install 'surgical-peft[plots]'`.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .files import write_file

__all__ = ["bar_chart", "save_figure"]

_BAR_COLOR = "#9aa9bd"
_HIGHLIGHT_COLOR = "#d9822b"


def bar_chart(
    values: Mapping[str, float],
    path: str | os.PathLike[str],
    *,
    title: str,
    ylabel: str,
    errors: Mapping[str, float] | None = None,
    highlight: str | None = None,
) -> Path:
    """Save a PNG bar chart of `values` (one bar per key, in order), each bar labelled with its value.

    Args:
        values: bar label -> height.
        path: where to write the PNG (parent directories are created).
        title: the chart's title.
        ylabel: the y axis label.
        errors: optional bar label -> half-height of an error bar (e.g. a standard deviation); missing labels get none.
        highlight: a key of `values` whose bar is drawn in an accent colour (e.g. the best one).

    Returns:
        `path` as a `Path`.

    Raises:
        ImportError: if matplotlib is not installed.
        ValueError: if `values` is empty, or `highlight` or a key of `errors` is not a key of `values`.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> path = bar_chart({"stage1": 91.0, "head": 60.5}, Path(tempfile.mkdtemp()) / "acc.png",
        ...                  title="Target accuracy", ylabel="accuracy (%)", highlight="stage1")
        >>> path.stat().st_size > 0
        True
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("bar_chart needs matplotlib: pip install 'surgical-peft[plots]'") from error
    if not values:
        raise ValueError("bar_chart needs at least one value.")
    unknown = sorted({*(errors or {}), *([highlight] if highlight is not None else [])} - set(values))
    if unknown:
        raise ValueError(f"{unknown} are not bars of the chart; its bars are {list(values)}.")

    labels = list(values)
    heights = [values[label] for label in labels]
    spreads = [(errors or {}).get(label, math.nan) for label in labels]  # NaN: no error bar
    colors = [_HIGHLIGHT_COLOR if label == highlight else _BAR_COLOR for label in labels]
    figure = Figure(figsize=(max(4.0, 0.9 * len(labels) + 1.5), 3.6), layout="constrained")
    axes = figure.subplots()
    bars = axes.bar(labels, heights, color=colors, yerr=spreads if errors else None, capsize=3)
    axes.bar_label(bars, labels=[f"{height:.3g}" for height in heights], padding=2, fontsize="small")
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.margins(y=0.12)
    axes.spines[["top", "right"]].set_visible(False)
    if max(len(label) for label in labels) > 8:
        axes.tick_params(axis="x", labelrotation=30)
    return save_figure(figure, path, dpi=120)


def save_figure(figure: Any, path: str | os.PathLike[str], *, dpi: int) -> Path:
    """Save a matplotlib `figure` to `path` (in the format its suffix names, PNG without one) through
    `surgical_peft.files.write_file`: never half-written, and a symlink at `path` is replaced, not written through.
    Parent directories are created."""
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=dpi, format=Path(path).suffix.lstrip(".") or "png")
    return write_file(path, buffer.getvalue())
