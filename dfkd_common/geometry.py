"""Image geometry: sizes are (H, W) everywhere; an int is accepted where a caller means a square.

Why one helper: datasets, banks, checkpoints, generators, augmentation and hooks all take an image size. They
used to take one int (square images only); a segmentation canvas or a user's own network need not be square, so
each of them normalises what it is given through :func:`as_hw` and formats shapes through :func:`shape_str`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

#: an image size: (H, W), or an int for a square
Size = int | Sequence[int]


def as_hw(size: Size) -> tuple[int, int]:
    """(H, W) of ``size``: an integer ``s`` is (s, s); a pair of integers is taken as (H, W)."""
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        return int(size), int(size)
    if isinstance(size, str | bytes) or not isinstance(size, Sequence | tuple) or len(size) != 2 or not all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        raise ValueError(f"an image size is an integer or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def shape_str(channels: int, size: Size) -> str:
    """``CxHxW``, as every message and table prints an input shape."""
    h, w = as_hw(size)
    return f"{channels}x{h}x{w}"
