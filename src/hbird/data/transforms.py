"""Geometric transforms shared by prompt and query images.

The encoder sees each image resized so its short side is ``image_size`` and both sides
are multiples of the patch size (aspect ratio kept up to that rounding): resize mode
``"short-side"``. Mode ``"square"`` squashes every image to ``image_size`` × ``image_size``
(rounded to the patch size), as open-hummingbird-eval does. Labels follow with
nearest-neighbour resampling so class ids and invalid markers are never blended.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RESIZE_MODES = ("short-side", "square")


def encoder_size(
    height: int, width: int, image_size: int, patch_size: int, resize: str = "short-side"
) -> tuple[int, int]:
    """Size ``(H', W')`` the encoder sees, multiples of the patch: short side ≈
    ``image_size`` (``resize="short-side"``), or both sides ≈ ``image_size`` (``"square"``)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}, got {resize!r}")
    if resize == "square":
        height = width = image_size
    scale = image_size / min(height, width)

    def snap(side: int) -> int:
        return max(patch_size, int(round(side * scale / patch_size)) * patch_size)

    return snap(height), snap(width)


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` or ``(B, 3, H, W)`` float → same layout at ``size``, bilinear, antialiased."""
    batched = image.ndim == 4
    x = image if batched else image[None]
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return x if batched else x[0]


def resize_label(label: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(H, W)`` or ``(H, W, C)`` label → ``size`` by nearest neighbour, dtype kept."""
    if tuple(label.shape[:2]) == tuple(size):
        return label
    x = label if label.ndim == 3 else label[..., None]
    x = x.permute(2, 0, 1)[None].to(torch.float64)
    x = F.interpolate(x, size=size, mode="nearest-exact")
    out = x[0].permute(1, 2, 0).to(label.dtype)
    return out if label.ndim == 3 else out[..., 0]


def resize_for_encoder(
    image: torch.Tensor, image_size: int, patch_size: int, resize: str = "short-side"
) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1] → ``(3, H', W')`` with ``(H', W') = encoder_size(...)``."""
    height, width = image.shape[-2:]
    return resize_image(image, encoder_size(height, width, image_size, patch_size, resize))
