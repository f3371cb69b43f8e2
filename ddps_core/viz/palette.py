"""A fixed, deterministic colour palette for class ids.

Class ``c`` gets the colour whose R, G, B bits are the interleaved bits of ``c`` (the scheme
PASCAL VOC made familiar): class 0 is black, neighbouring ids get clearly different colours,
and the same id has the same colour in every picture the project makes. The ignore index gets
a fixed light grey regardless of its value.
"""

from __future__ import annotations

import numpy as np

IGNORE_COLOR = (224, 224, 192)


def palette(n: int = 256) -> np.ndarray:
    """Colours of class ids ``0 .. n-1`` as a ``uint8 [n, 3]`` array."""
    ids = np.arange(n, dtype=np.int64)
    out = np.zeros((n, 3), dtype=np.int64)
    bits = ids.copy()
    for shift in range(7, -1, -1):
        for channel in range(3):
            out[:, channel] |= ((bits >> channel) & 1) << shift
        bits >>= 3
    return out.astype(np.uint8)


def colorize(label: np.ndarray, ignore_index: int | None = 255) -> np.ndarray:
    """Map an integer ``H x W`` label map to ``uint8 H x W x 3`` colours."""
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"label map must be 2-D, got shape {label.shape}")
    ids = label.astype(np.int64)
    n = max(int(ids.max(initial=0)) + 1, 1)
    colours = palette(n)[np.clip(ids, 0, None)]
    if ignore_index is not None:
        colours[ids == ignore_index] = IGNORE_COLOR
    return colours
