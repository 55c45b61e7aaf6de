"""Panoptic-DeepLab's instance targets (Cheng et al. 2020; thesis §3.3 uses its heads).

For every thing instance (a ``(class, instance)`` segment of a thing class with
instance ``>= 1``; crowds and stuff have none) with centre of mass ``c = (c_y, c_x)``:

* the centre heatmap is ``max_instances exp(-|p - c|² / (2σ²))`` over all pixels
  ``p``, σ = 8 px;
* the offset of a pixel ``p`` of the instance is ``c - p`` (pointing at its centre),
  ``(2, H, W)`` as ``(dy, dx)`` in pixels; pixels of no instance have offset 0 and
  ``mask`` False.

Centres are the exact (sub-pixel) centres of mass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

CENTRE_SIGMA = 8.0
"""σ in pixels of the centre heatmap's Gaussians (Panoptic-DeepLab)."""


@dataclass(frozen=True)
class InstanceCentres:
    """The thing instances of a panoptic map.

    Attributes:
        masks: ``(K, H, W)`` bool, one per instance.
        classes: ``(K,)`` int64 class of each instance.
        centres: ``(K, 2)`` float64 centres of mass ``(y, x)`` in pixels.
    """

    masks: torch.Tensor
    classes: torch.Tensor
    centres: torch.Tensor


def instance_centres(
    semantic: torch.Tensor, instance: torch.Tensor, thing_classes: Sequence[int]
) -> InstanceCentres:
    """Every thing instance of ``(semantic, instance)`` ``(H, W)`` with its centre of mass."""
    height, width = semantic.shape
    is_thing = torch.isin(semantic, torch.as_tensor(list(thing_classes), dtype=semantic.dtype))
    keys = torch.unique(torch.stack([semantic[is_thing], instance[is_thing]], 1), dim=0)
    keys = keys[keys[:, 1] > 0]  # instance 0 of a thing: a crowd, no centre
    masks = (semantic[None] == keys[:, :1, None]) & (instance[None] == keys[:, 1:, None])
    ys = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    area = masks.sum(dim=(1, 2)).to(torch.float64)
    cy = (masks * ys).sum(dim=(1, 2)) / area
    cx = (masks * xs).sum(dim=(1, 2)) / area
    return InstanceCentres(masks, keys[:, 0].to(torch.int64), torch.stack([cy, cx], 1))


def centre_heatmap(
    centres: torch.Tensor, size: tuple[int, int], sigma: float = CENTRE_SIGMA
) -> torch.Tensor:
    """``(H, W)`` float32: the max over ``centres`` ``(K, 2)`` of a Gaussian of σ ``sigma``."""
    height, width = size
    if len(centres) == 0:
        return torch.zeros(size, dtype=torch.float32)
    ys = torch.arange(height, dtype=torch.float64)[None, :, None]
    xs = torch.arange(width, dtype=torch.float64)[None, None, :]
    cy, cx = centres[:, 0, None, None], centres[:, 1, None, None]
    gauss = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2.0 * sigma**2))
    return gauss.amax(dim=0).to(torch.float32)


def centre_offsets(found: InstanceCentres) -> tuple[torch.Tensor, torch.Tensor]:
    """``(offsets (2, H, W) float32 = centre - pixel, mask (H, W) bool)`` of the instances."""
    k, height, width = found.masks.shape
    ys = torch.arange(height, dtype=torch.float64)[:, None].expand(height, width)
    xs = torch.arange(width, dtype=torch.float64)[None, :].expand(height, width)
    offsets = torch.zeros(2, height, width, dtype=torch.float64)
    for mask, (cy, cx) in zip(found.masks, found.centres.tolist()):
        offsets[0][mask] = cy - ys[mask]
        offsets[1][mask] = cx - xs[mask]
    mask = found.masks.any(dim=0) if k else torch.zeros(height, width, dtype=torch.bool)
    return offsets.to(torch.float32), mask


def panoptic_targets(
    semantic: torch.Tensor,
    instance: torch.Tensor,
    thing_classes: Sequence[int],
    sigma: float = CENTRE_SIGMA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(heatmap (H, W), offsets (2, H, W), offset mask (H, W))`` of a panoptic map."""
    found = instance_centres(semantic, instance, thing_classes)
    offsets, mask = centre_offsets(found)
    return centre_heatmap(found.centres, tuple(semantic.shape), sigma), offsets, mask
