"""Pixel labels → patch labels (Balazevic et al. 2023, appendix A.1).

Every memory entry pairs one patch feature with one patch label:

- segmentation: the fraction of the patch's labelled pixels that belong to each class;
  ignore-index pixels are left out of the fractions and a patch with no labelled
  pixel is marked invalid (it is never stored). The rule ``ignore_as_class0`` instead
  counts ignore pixels as class 0 (open-hummingbird-eval's pooling: every patch is
  valid, and its fractions are over all its pixels);
- depth / regression: the mean of the patch's valid pixels per channel; a pixel is
  invalid if it is NaN, inf, outside ``[min_value, max_value]`` or, for depth, ≤ 0.

Labels must already be at the encoder's input size, i.e. ``H = h · patch`` and
``W = w · patch`` (see :func:`hbird.data.transforms.resize_label`).
"""

from __future__ import annotations

import torch

from hbird.errors import InputError
from hbird.labelspec import LabelSpec


def _check_grid(shape: tuple[int, ...], patch_size: int) -> tuple[int, int]:
    height, width = shape[:2]
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"label size {height}x{width} is not a multiple of the patch size {patch_size}"
        )
    return height // patch_size, width // patch_size


def patch_ids(
    height: int, width: int, patch_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """``(H, W)`` int64 map giving each pixel the row-major index of its patch."""
    rows = torch.arange(height, device=device) // patch_size
    cols = torch.arange(width, device=device) // patch_size
    return rows[:, None] * (width // patch_size) + cols[None, :]


def pool_segmentation(
    mask: torch.Tensor,
    patch_size: int,
    num_classes: int,
    ignore_index: int | None = 255,
    ignore_as_class0: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class fractions per patch.

    Args:
        mask: ``(H, W)`` integer class ids, ``H`` and ``W`` multiples of ``patch_size``.
        ignore_as_class0: count ``ignore_index`` pixels as class 0 instead of leaving
            them out.

    Returns:
        values: ``(h · w, num_classes)`` float32, rows sum to 1 for valid patches, 0 else.
        valid: ``(h · w,)`` bool, False where every pixel of the patch is ignored.
    """
    h, w = _check_grid(tuple(mask.shape), patch_size)
    mask = mask.long()
    if ignore_as_class0 and ignore_index is not None:
        mask = mask.masked_fill(mask == ignore_index, 0)
    keep = torch.ones_like(mask, dtype=torch.bool) if ignore_index is None else mask != ignore_index
    labels = mask[keep]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        bad = torch.unique(labels[(labels < 0) | (labels >= num_classes)])[:10].tolist()
        raise InputError(
            f"label values {bad} are outside 0..{num_classes - 1} and are not the ignore index "
            f"{ignore_index}; set num_classes/ignore_index to match the masks"
        )
    pid = patch_ids(*mask.shape, patch_size, device=mask.device)[keep]
    counts = torch.bincount(pid * num_classes + labels, minlength=h * w * num_classes)
    counts = counts.view(h * w, num_classes).to(torch.float32)
    totals = counts.sum(dim=1)
    valid = totals > 0
    values = counts / totals.clamp_min(1.0)[:, None]
    return values, valid


def valid_target_mask(target: torch.Tensor, spec: LabelSpec) -> torch.Tensor:
    """``(H, W)`` bool: pixels whose every channel is finite and inside the valid range."""
    x = target if target.ndim == 3 else target[..., None]
    ok = torch.isfinite(x) & (x >= spec.min_value) & (x <= spec.max_value)
    if spec.task == "depth":
        ok &= x > 0
    return ok.all(dim=-1)


def pool_regression(
    target: torch.Tensor, patch_size: int, spec: LabelSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of valid pixels per patch.

    Args:
        target: ``(H, W)`` or ``(H, W, C)`` float values.

    Returns:
        values: ``(h · w, C)`` float32 means over valid pixels (0 for invalid patches).
        valid: ``(h · w,)`` bool, False where no pixel of the patch is valid.
    """
    h, w = _check_grid(tuple(target.shape), patch_size)
    x = (target if target.ndim == 3 else target[..., None]).to(torch.float32)
    ok = valid_target_mask(target, spec)
    pid = patch_ids(*x.shape[:2], patch_size, device=x.device)[ok]
    n = h * w
    counts = torch.bincount(pid, minlength=n).to(torch.float32)
    sums = torch.zeros(n, x.shape[-1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, pid, x[ok].to(torch.float64))
    valid = counts > 0
    values = (sums / counts.clamp_min(1.0)[:, None]).to(torch.float32)
    return values, valid


def pool_labels(
    label: torch.Tensor, patch_size: int, spec: LabelSpec, ignore_as_class0: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch on ``spec.task``; returns ``(values (N, value_dim), valid (N,))``.
    ``ignore_as_class0`` applies to segmentation only (see :func:`pool_segmentation`)."""
    if spec.task == "segmentation":
        num_classes, ignore = int(spec.num_classes), spec.ignore_index
        return pool_segmentation(label, patch_size, num_classes, ignore, ignore_as_class0)
    return pool_regression(label, patch_size, spec)
