"""Class colours: masks drawn in the PASCAL VOC colour map.

The map itself (:func:`hbird.io.images.voc_palette`) and the label and depth files that
use it are written and read in :mod:`hbird.io.images`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hbird.errors import InputError
from hbird.io.images import class_ids, voc_palette

IGNORE_COLOR = (255, 255, 255)
"""How ignored pixels are shown: white, outside every class colour of the VOC map."""


def colorize_mask(
    mask: Any,
    ignore_index: int | None = 255,
    palette: np.ndarray | None = None,
    ignore_color: tuple[int, int, int] = IGNORE_COLOR,
) -> np.ndarray:
    """Class ids ``(H, W)`` → colours ``(H, W, 3)`` uint8.

    Args:
        mask: integer class ids (tensor or array).
        ignore_index: id of unlabelled pixels, drawn in ``ignore_color``; ``None`` for none.
        palette: ``(K, 3)`` uint8 colours; default the VOC map, as long as the ids need.
        ignore_color: RGB of ignored pixels (white by default).
    """
    ids = class_ids(mask)
    ignored = ids == ignore_index if ignore_index is not None else np.zeros(ids.shape, dtype=bool)
    labelled = ids[~ignored]
    if labelled.size and labelled.min() < 0:
        raise InputError(
            f"mask holds negative class id {int(labelled.min())}; ids must be >= 0 "
            f"(set ignore_index={int(labelled.min())} if it marks unlabelled pixels)"
        )
    top = int(labelled.max()) if labelled.size else 0
    if palette is None:
        palette = voc_palette(max(256, top + 1))
    palette = np.asarray(palette, dtype=np.uint8)
    if palette.ndim != 2 or palette.shape[1] != 3:
        raise ValueError(f"palette must have shape (K, 3), got {palette.shape}")
    if top >= len(palette):
        raise InputError(
            f"mask holds class id {top} but the palette has only {len(palette)} colours"
        )
    out = palette[np.where(ignored, 0, ids)]
    out[ignored] = ignore_color
    return out
