"""Turning what users pass (paths, PIL images, arrays, tensors) into tensors.

Images become ``(3, H, W)`` float32 in [0, 1]; labels become ``(H, W)`` int64 class ids
or ``(H, W[, C])`` float32 values, checked against their image's size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hbird.errors import InputError
from hbird.io.images import load_depth, load_image, load_mask, pil_to_tensor_rgb
from hbird.labelspec import LabelSpec

ImageLike = str | Path | Image.Image | np.ndarray | torch.Tensor


def describe(item: Any, index: int) -> str:
    """How to name an input in an error message: its path, or its position."""
    return str(item) if isinstance(item, str | Path) else f"input #{index}"


def as_image(item: ImageLike) -> torch.Tensor:
    """One image → ``(3, H, W)`` float32 in [0, 1]."""
    if isinstance(item, str | Path):
        return load_image(item)
    if isinstance(item, Image.Image):
        return pil_to_tensor_rgb(item)
    if isinstance(item, np.ndarray):
        arr = item
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
            raise InputError(
                f"image array of shape {arr.shape} is not (H, W), (H, W, 3) or (H, W, 4)"
            )
        arr = arr[..., :3]
        x = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)
        return x.float() / 255.0 if arr.dtype == np.uint8 else x.float()
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] != 3:
            raise InputError(f"image tensor of shape {tuple(item.shape)} is not (3, H, W)")
        return item.float() / 255.0 if item.dtype == torch.uint8 else item.float()
    raise InputError(
        f"cannot read an image from a {type(item).__name__}; pass a path, PIL image, array or tensor"
    )


def as_images(items: Sequence[ImageLike] | torch.Tensor) -> list[torch.Tensor]:
    """A batch tensor ``(B, 3, H, W)`` or a sequence of images → list of ``(3, H, W)``."""
    if isinstance(items, torch.Tensor) and items.ndim == 4:
        return [as_image(x) for x in items]
    if isinstance(items, str | Path | Image.Image) or (
        isinstance(items, torch.Tensor | np.ndarray) and items.ndim == 3
    ):
        return [as_image(items)]
    return [as_image(x) for x in items]


def as_label(item: Any, spec: LabelSpec) -> torch.Tensor:
    """One label → ``(H, W)`` int64 (segmentation) or ``(H, W[, C])`` float32."""
    if isinstance(item, str | Path):
        return load_mask(item) if spec.task == "segmentation" else load_depth(item)
    if isinstance(item, Image.Image):
        item = np.asarray(item)
    x = torch.from_numpy(np.ascontiguousarray(item)) if isinstance(item, np.ndarray) else item
    if not isinstance(x, torch.Tensor):
        raise InputError(
            f"cannot read a label from a {type(item).__name__}; pass a path, array or tensor"
        )
    if spec.task == "segmentation":
        if x.ndim != 2 or x.dtype.is_floating_point:
            raise InputError(
                f"a segmentation label must be a 2-D integer array, got {tuple(x.shape)} {x.dtype}"
            )
        return x.to(torch.int64)
    if spec.task == "depth" and x.ndim == 3 and x.shape[-1] == 1:
        x = x[..., 0]
    return x.to(torch.float32)


def check_pair(image: torch.Tensor, label: torch.Tensor, name: str, label_name: str) -> None:
    """Raise unless ``label`` covers ``image`` pixel for pixel."""
    if tuple(label.shape[:2]) != tuple(image.shape[-2:]):
        raise InputError(
            f"label {label_name} is {label.shape[1]}x{label.shape[0]} (WxH) but its image {name} is "
            f"{image.shape[-1]}x{image.shape[-2]}; masks must have exactly the size of their image"
        )
