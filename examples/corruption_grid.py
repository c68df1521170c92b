"""Render every CIFAR-10-C corruption of one handwritten digit at severities 1, 3 and 5.

Run from the repository root (needs the ``plots`` extra: ``pip install 'surgical-peft[plots]'``)::

    python examples/corruption_grid.py

It writes ``docs/corruption_grid.png``.
"""

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from surgical_peft.experiments.shifts import plot_corruption_grid

digit = load_digits().images[0]  # an 8x8 "0", ink from 0 to 16
image = Image.fromarray(np.uint8(digit * 255 / 16)).resize((32, 32), Image.Resampling.NEAREST)
path = plot_corruption_grid(image, "docs/corruption_grid.png", severities=(1, 3, 5), seed=0)
print(f"Wrote {path}")
