"""Small conversions shared by the viz modules: tensors/arrays in, numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(x: Any) -> np.ndarray:
    """A torch tensor (any device, with or without grad), array or nested list → ndarray."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def as_rgb_uint8(image: Any) -> np.ndarray:
    """An image in any usual layout → ``(H, W, 3)`` uint8.

    Accepted: ``(3, H, W)`` float in [0, 1] (what ``hbird.io.images.load_image`` returns),
    ``(H, W, 3)`` uint8 or float in [0, 1], ``(H, W)`` grayscale (uint8 or float), a PIL image.
    """
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()
    arr = to_numpy(image)
    if arr.ndim == 2:
        arr = arr[..., None].repeat(3, axis=-1)
    elif arr.ndim == 3 and arr.shape[0] == 3 and (arr.shape[-1] != 3 or arr.dtype != np.uint8):
        arr = arr.transpose(1, 2, 0)  # channels-first, like load_image (floats if ambiguous)
    if arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"image of shape {arr.shape} is not an RGB image; pass (3, H, W) float in [0, 1] "
            "or (H, W, 3) uint8"
        )
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"image has dtype {arr.dtype}; expected float in [0, 1] or uint8")
    if np.issubdtype(arr.dtype, np.integer):
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = np.nan_to_num(arr.astype(np.float32), nan=0.0)
    return (np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def resize_nearest(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(h, w, ...)`` array → ``(H, W, ...)`` by nearest neighbour (pixel centres), any dtype."""
    h, w = arr.shape[:2]
    height, width = size
    if (h, w) == (height, width):
        return arr
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return arr[rows[:, None], cols[None, :]]
