"""Panoptic pictures: class colours over the image with every segment's outline drawn,
as Panoptic-DeepLab's and detectron2's visualisers show them.

Each thing instance gets its class colour shifted in brightness by its instance id, so
neighbouring instances of one class differ; a white line follows every boundary
between segments (class or instance changes), void shows the bare image.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hbird.io.images import save_image
from hbird.viz._arrays import as_rgb_uint8, resize_nearest, to_numpy
from hbird.viz.overlay import GAP, _stack, class_legend, overlay, panel

OUTLINE = (255, 255, 255)


def segment_ids(semantic: Any, instance: Any) -> np.ndarray:
    """``(H, W)`` int64 id per segment: ``class · 2^20 + instance``."""
    return to_numpy(semantic).astype(np.int64) * (1 << 20) + to_numpy(instance).astype(np.int64)


def boundaries(ids: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels with a 4-neighbour of another id (both sides marked)."""
    edge = np.zeros(ids.shape, dtype=bool)
    down, right = ids[1:] != ids[:-1], ids[:, 1:] != ids[:, :-1]
    edge[1:] |= down
    edge[:-1] |= down
    edge[:, 1:] |= right
    edge[:, :-1] |= right
    return edge


def panoptic_overlay(
    image: Any,
    semantic: Any,
    instance: Any,
    ignore_index: int | None = 255,
    alpha: float = 0.55,
) -> np.ndarray:
    """Class colours (instances shaded apart) over ``image`` with segment outlines:
    ``(H, W, 3)`` uint8. ``semantic`` and ``instance`` are ``(H, W)`` at the image's size."""
    rgb = as_rgb_uint8(image)
    sem, inst = to_numpy(semantic).astype(np.int64), to_numpy(instance).astype(np.int64)
    out = overlay(rgb, sem, alpha=alpha, ignore_index=ignore_index).astype(np.float32)
    shade = np.where(inst > 0, 0.75 + 0.5 * ((inst * 0.618) % 1.0), 1.0)[..., None]
    out = np.clip(np.where(inst[..., None] > 0, out * shade, out), 0, 255).astype(np.uint8)
    out[boundaries(segment_ids(sem, inst))] = OUTLINE
    return out


def save_panoptic_panel(
    path: str | Path,
    image: Any,
    prediction: tuple[Any, Any],
    ground_truth: tuple[Any, Any] | None = None,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    min_height: int = 160,
) -> Path:
    """Write ``image | ground truth | prediction`` (panoptic overlays) with a class legend.

    Args:
        prediction, ground_truth: ``(semantic, instance)`` pairs of ``(H, W)`` maps.
    """
    rgb = as_rgb_uint8(image)
    size = rgb.shape[:2]
    pairs = [("prediction", prediction)]
    if ground_truth is not None:
        pairs.insert(0, ("ground truth", ground_truth))
    pictures, titles, shown = [rgb], ["image"], set()
    for title, (sem, inst) in pairs:
        sem_a = resize_nearest(to_numpy(sem), size)
        inst_a = resize_nearest(to_numpy(inst), size)
        pictures.append(panoptic_overlay(rgb, sem_a, inst_a, ignore_index))
        titles.append(title)
        shown |= {int(c) for c in np.unique(sem_a) if c != ignore_index and c >= 0}
    height = max(size[0], min_height)
    resample = Image.Resampling.NEAREST if height % size[0] == 0 else Image.Resampling.BILINEAR
    picture = panel(pictures, titles, height=height, resample=resample, gap=GAP)
    if class_names is not None and shown:
        picture = _stack(picture, class_legend(sorted(shown), class_names, picture.width))
    return save_image(path, picture)
