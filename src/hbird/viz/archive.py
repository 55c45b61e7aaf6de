"""What co-segmentation found in one class's archive: each image with its seed patches
boxed, over the seed score ``s`` it was picked by (ReCo, issue 11: "users want to see why
a class failed")."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hbird.io.images import save_image
from hbird.viz.correspondence import NEIGHBOUR_BOX, _boxed
from hbird.viz.depth import apply_colormap
from hbird.viz.overlay import _stack, panel

SCORE_CMAP = "magma"


def save_archive_picture(
    path: str | Path,
    images: Sequence[Any],
    seeds: Sequence[Sequence[int]],
    grid: tuple[int, int],
    scores: Sequence[Any] | None = None,
    title: str = "",
    height: int = 128,
) -> Path:
    """Write ``path``: the archive images (``(3, S, S)`` crops the encoder saw) with their
    seeds (flat indices into the ``grid = (h, w)`` patch grid) boxed, and under them the
    seed scores ``(h, w)`` as a colour map (brighter: a stronger seed)."""
    if not images:
        raise ValueError("an archive picture needs at least one image")
    h, w = grid
    height = h * max(1, round(height / h))  # a whole number of pixels per patch
    boxed = []
    for image, image_seeds in zip(images, seeds):
        picture, patch = image, int(image.shape[-2]) // h  # the crop's own patch grid
        for seed in image_seeds:
            yx = (int(seed) // w, int(seed) % w)
            picture = np.asarray(_boxed(picture, yx, patch, height, NEIGHBOUR_BOX, "seed"))
            patch = height // h  # later seeds are drawn on the resized picture
        boxed.append(picture)
    titles = [title] + [""] * (len(boxed) - 1)
    top = panel(boxed, titles, height=height)
    if scores is not None:
        maps = [np.asarray(s, dtype=np.float32) for s in scores]
        low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
        coloured = [apply_colormap(m, low, high, SCORE_CMAP) for m in maps]
        bottom = panel(coloured, height=height, resample=Image.Resampling.NEAREST)
        top = _stack(top, bottom)
    return save_image(Path(path), top)
