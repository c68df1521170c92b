"""Images as training reads them: 8-bit RGB, from any mode PIL opens, with each mode's own scale.

PIL's `convert("RGB")` reads the 16-bit and 32-bit modes as if they were 8-bit and clips them: a 16-bit PNG
(`I;16`) or a float TIFF (`F`) comes out as two or three distinct values. Here `I;16` (and its byte orders) is
scaled by 1/257 (65535 to 255), `I` (32-bit integers, as PIL opens 16-bit grayscale files of other formats) the
same when its values are within 0 to 65535, and `F` (32-bit floats) by 255 when its values are within 0 to 1. Other
values of `I` or `F` have no scale this can know: `unreadable_mode` says why, and loading refuses the file
(`surgical_peft.experiments.data.load_image_dataset`), naming it and its mode.

Example:
    >>> import numpy as np
    >>> sixteen_bit = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    >>> sixteen_bit.mode, np.asarray(sixteen_bit.convert("RGB"))[0, :, 0].tolist()  # PIL's own: clipped
    ('I;16', [0, 255, 255])
    >>> np.asarray(to_rgb(sixteen_bit))[0, :, 0].tolist()
    [0, 128, 255]
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["WIDE_MODES", "to_rgb", "unreadable_mode"]

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
"""The modes whose values are not 8-bit: `to_rgb` scales them (PIL's `convert("RGB")` clips them)."""

_SIXTEEN_BIT = 65535


def _value_range(image: Image.Image) -> tuple[float, float]:
    values = np.asarray(image)
    return (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)


def unreadable_mode(image: Image.Image) -> str | None:
    """Why `image` cannot be read as RGB with a known scale (its mode, and for `I` and `F` the values found), or
    `None` if it can (`to_rgb`).

    Example:
        >>> unreadable_mode(Image.new("F", (2, 2), 3.5))
        'mode F (32-bit float) with values from 3.5 to 3.5, not within 0 to 1'
    """
    if image.mode in ("I", "F"):
        low, high = _value_range(image)
        top, kind = (1, "32-bit float") if image.mode == "F" else (_SIXTEEN_BIT, "32-bit integer")
        if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high <= top):
            return f"mode {image.mode} ({kind}) with values from {low:g} to {high:g}, not within 0 to {top}"
    return None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB, each mode at its own scale (see the module's docstring); 8-bit modes as PIL converts
    them.

    Example:
        >>> to_rgb(Image.new("F", (1, 1), 0.5)).getpixel((0, 0))
        (128, 128, 128)
    """
    if image.mode in WIDE_MODES:
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if image.mode == "F" else 255.0 / _SIXTEEN_BIT
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")
