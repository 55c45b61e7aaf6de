"""Thing pixels → instances: connected components, or Panoptic-DeepLab's grouping.

Panoptic-DeepLab's inference (Cheng et al. 2020; thesis §3.3 and issue 13 part 3):

1. centres: keep the pixels of a centre heatmap that are its maximum over a 7 x 7
   window (NMS by max-pooling) and above 0.1;
2. each thing pixel ``p`` (its semantic class is a thing) goes to the centre nearest
   to ``p + offset(p)``;
3. each instance takes the majority class of the semantic prediction over its pixels;
4. small segments become void: stuff below the stuff area limit (2048 px at
   Cityscapes' 1024 x 2048, scaled to the image area), things below the thing limit.

Retrieval predicts offsets but no heatmap, so :func:`vote_heatmap` makes one from the
offsets themselves: every thing pixel votes for ``p + offset(p)``; the votes, blurred
by a Gaussian, peak at the centres (a Hough transform). It reads in votes (``n`` votes
piled on one pixel read ``n``), so its threshold is a number of votes, ``min_votes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hbird._optional import require
from hbird.data.panoptic import PanopticMap

CENTRE_THRESHOLD = 0.1
NMS_KERNEL = 7
STUFF_AREA = 2048 / (1024 * 2048)
"""Panoptic-DeepLab's stuff area limit on Cityscapes, as a fraction of the image."""
THING_AREA = 256 / (641 * 641)
"""MaX-DeepLab's thing area limit on COCO (641 x 641 inputs), as a fraction of the image."""


def _thing_mask(semantic: torch.Tensor, thing_classes: Sequence[int]) -> torch.Tensor:
    return torch.isin(semantic, torch.as_tensor(list(thing_classes), dtype=semantic.dtype))


def connected_components(
    semantic: torch.Tensor, thing_classes: Sequence[int], connectivity: int = 4
) -> torch.Tensor:
    """``(H, W)`` instance ids: the connected components of each thing class, numbered
    1, 2, ... within the class (0 elsewhere). ``connectivity``: 4 or 8."""
    ndimage = require("scipy", "connected components of thing classes").ndimage
    structure = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    out = torch.zeros_like(semantic, dtype=torch.int64)
    for c in thing_classes:
        labels, _ = ndimage.label((semantic == c).cpu().numpy(), structure=structure)
        out = torch.where(semantic == c, torch.from_numpy(labels).to(torch.int64), out)
    return out


def find_centres(
    heatmap: torch.Tensor, threshold: float = CENTRE_THRESHOLD, nms_kernel: int = NMS_KERNEL
) -> torch.Tensor:
    """``(K, 2)`` int64 ``(y, x)`` of the pixels of ``heatmap`` ``(H, W)`` that are the
    maximum of their ``nms_kernel`` window and above ``threshold``, strongest first."""
    pooled = F.max_pool2d(heatmap[None, None], nms_kernel, stride=1, padding=nms_kernel // 2)[0, 0]
    peaks = (heatmap == pooled) & (heatmap > threshold)
    where = torch.nonzero(peaks)
    order = torch.argsort(heatmap[peaks], descending=True, stable=True)
    return where[order]


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(taps**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    y = F.conv2d(x[None, None], kernel.view(1, 1, 1, -1), padding=(0, radius))
    return F.conv2d(y, kernel.view(1, 1, -1, 1), padding=(radius, 0))[0, 0]


def vote_heatmap(offsets: torch.Tensor, voters: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Centre heatmap ``(H, W)`` in votes, from offset votes (see the module docstring).

    Args:
        offsets: ``(2, H, W)`` ``(dy, dx)`` in pixels, pointing at the centre.
        voters: ``(H, W)`` bool, the pixels that vote (the thing pixels).
        sigma: the blur in pixels.
    """
    height, width = voters.shape
    ys, xs = torch.nonzero(voters, as_tuple=True)
    ty = (ys.to(torch.float32) + offsets[0][voters]).round().clamp(0, height - 1).long()
    tx = (xs.to(torch.float32) + offsets[1][voters]).round().clamp(0, width - 1).long()
    votes = torch.bincount(ty * width + tx, minlength=height * width).to(torch.float32)
    peak_of_one = _gaussian_blur(torch.zeros(1, 1).new_ones(1, 1), sigma).amax()  # the centre tap
    return _gaussian_blur(votes.view(height, width), sigma) / peak_of_one


def assign_to_centres(
    offsets: torch.Tensor, thing: torch.Tensor, centres: torch.Tensor
) -> torch.Tensor:
    """``(H, W)`` int64: for each ``thing`` pixel, 1 + the index of the centre nearest to
    ``p + offset(p)``; 0 elsewhere (and everywhere when there is no centre)."""
    height, width = thing.shape
    out = torch.zeros(height, width, dtype=torch.int64)
    if len(centres) == 0:
        return out
    ys, xs = torch.nonzero(thing, as_tuple=True)
    voted = torch.stack([ys + offsets[0][thing], xs + offsets[1][thing]], 1)  # (P, 2)
    nearest = torch.cdist(voted.to(torch.float32), centres.to(torch.float32)).argmin(dim=1)
    out[ys, xs] = nearest + 1
    return out


def merge_semantic_and_instances(
    semantic: torch.Tensor,
    instances: torch.Tensor,
    thing_classes: Sequence[int],
    ignore_index: int = 255,
    stuff_area: float = STUFF_AREA,
    thing_area: float = THING_AREA,
) -> PanopticMap:
    """Class-agnostic ``instances`` ``(H, W)`` (0: none) + ``semantic`` → a PanopticMap.

    Each instance takes the majority semantic class of its pixels (ties: the lower id)
    and is numbered 1, 2... within that class; thing pixels of no instance become void;
    stuff classes under ``stuff_area`` and instances under ``thing_area`` (fractions of
    the image) become void.
    """
    height, width = semantic.shape
    pixels = height * width
    things = _thing_mask(semantic, thing_classes)
    out_sem = torch.where(things & (instances == 0), ignore_index, semantic)
    out_inst = torch.zeros_like(semantic, dtype=torch.int64)
    counts: dict[int, int] = {}
    for k in torch.unique(instances[things & (instances > 0)]).tolist():
        member = (instances == k) & things
        cls = int(torch.mode(semantic[member]).values) if member.any() else None
        if cls is None or member.sum() < thing_area * pixels:
            out_sem[member] = ignore_index
            continue
        counts[cls] = counts.get(cls, 0) + 1
        out_sem[member], out_inst[member] = cls, counts[cls]
    for c in torch.unique(out_sem[~things]).tolist():
        region = (out_sem == c) & ~things
        if c != ignore_index and region.sum() < stuff_area * pixels:
            out_sem[region] = ignore_index
    return PanopticMap(out_sem, out_inst)


def group_components(
    semantic: torch.Tensor, thing_classes: Sequence[int], ignore_index: int = 255
) -> PanopticMap:
    """Predicted semantic map → panoptic map, instances by connected components."""
    instances = connected_components(semantic, thing_classes)
    # components are per class already: make them class-agnostic ids for the merge
    agnostic = torch.where(instances > 0, semantic * (int(instances.max()) + 1) + instances, 0)
    return merge_semantic_and_instances(semantic, agnostic, thing_classes, ignore_index)


def group_offsets(
    semantic: torch.Tensor,
    offsets: torch.Tensor,
    thing_classes: Sequence[int],
    ignore_index: int = 255,
    heatmap: torch.Tensor | None = None,
    min_votes: float | None = None,
    vote_sigma: float = 1.0,
    nms_kernel: int = NMS_KERNEL,
) -> PanopticMap:
    """Panoptic-DeepLab's grouping of a semantic map ``(H, W)`` and offsets ``(2, H, W)``.

    Args:
        heatmap: a centre heatmap ``(H, W)`` in [0, 1], thresholded at 0.1; default
            :func:`vote_heatmap` of the offsets (blurred by ``vote_sigma`` px),
            thresholded at ``min_votes`` (default: the thing area limit, at least 4 votes).
        nms_kernel: the max-pooling window of the NMS (7: Panoptic-DeepLab's).
    """
    things = _thing_mask(semantic, thing_classes)
    threshold = CENTRE_THRESHOLD
    if heatmap is None:
        pixels = semantic.numel()
        threshold = max(4.0, THING_AREA * pixels) if min_votes is None else float(min_votes)
        heatmap = vote_heatmap(offsets, things, vote_sigma)
    centres = find_centres(heatmap, threshold, nms_kernel)
    instances = assign_to_centres(offsets, things, centres)
    return merge_semantic_and_instances(semantic, instances, thing_classes, ignore_index)
