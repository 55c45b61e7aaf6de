"""MaX-DeepLab's losses as pure functions (Wang et al., thesis §4.3.2 and §4.3.4).

One image at a time. The model predicts ``N`` slots: mask logits ``(N, H, W)`` (the
masks are their softmax over slots, eq. 4.15) and class logits ``(N, C + 1)`` (the last
class is ∅, "no object"). The ground truth is ``K`` class-labelled masks
(:func:`ground_truth_masks`: one per thing instance and one per present stuff class) and
the void pixels.

* Dice with smoothing 1 on void-zeroed masks: ``(2 Σ m m̂ + 1) / (Σ m + Σ m̂ + 1)``;
* similarity (eq. 4.6): ``sim(y_i, ŷ_j) = p̂_j(c_i) · Dice(m_i, m̂_j)``;
* Hungarian matching maximising the total similarity (eq. 4.7-4.8; scipy's
  ``linear_sum_assignment``); with more masks than slots the ``N`` best are matched;
* L_pos (eq. 4.10, with 1 - Dice so a perfect prediction costs 0) =
  ``Σ_i p̂(c_i)[stop-grad] · (1 - Dice_i) + Dice_i[stop-grad] · (-log p̂(c_i))``;
* L_neg (eq. 4.11) = ``Σ_unmatched slots -log p̂(∅)``;
* L_PQ (eq. 4.12) = ``(α L_pos + (1 - α) L_neg) / N``, α = 0.75; weighted 3 in the total;
* instance discrimination (eq. 4.16-4.17), τ = 0.3, weight 1, averaged over the pixels
  of thing instances; mask-ID cross-entropy over slots (each labelled pixel's target is
  the slot matched to its mask), weight 0.3; semantic cross-entropy, weight 1.

Crowd regions (thing pixels of instance 0) are treated as void.

**Normalisation** (what makes a DDP run the one-process run): every term is normalised
within its image, and the model's loss is the mean of the per-image terms over the batch,
as google-research/deeplab2 (the authors' code) does: its losses return one value per
sample and are averaged over the global batch. Per term:

* L_PQ: divided by the image's ``N`` slots (eq. 4.12; a constant, so per image and
  global agree);
* instance discrimination: the mean over the image's thing-instance pixels (eq. 4.17
  sums per pixel; deeplab2 averages per sample);
* mask-ID cross-entropy: the mean over the image's pixels of matched masks;
* semantic cross-entropy: the mean over the image's labelled pixels.

An image without pixels for a term contributes 0 to that term's batch mean (deeplab2's
``divide_no_nan``). So on ``W`` processes with ``B / W`` images each, DDP's average of
the local batch means is the mean over all ``B`` images: no count has to be shared
across processes. (Global pixel counts would weight images by their size of thing
area instead; the paper does not ask for that.)

The functions compute in the predictions' dtype (float64 stays float64).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hbird._optional import require

ALPHA = 0.75
DICE_SMOOTH = 1.0
TAU = 0.3
LOSS_WEIGHTS = {"pq": 3.0, "instance_discrimination": 1.0, "mask_id": 0.3, "semantic": 1.0}
"""Weights of the terms in MaX-DeepLab's total loss (thesis §4.4)."""


@dataclass(frozen=True)
class GroundTruthMasks:
    """``masks`` ``(K, H, W)`` float {0, 1}, ``classes`` ``(K,)`` int64, ``is_thing``
    ``(K,)`` bool, ``void`` ``(H, W)`` bool (void and crowd pixels)."""

    masks: torch.Tensor
    classes: torch.Tensor
    is_thing: torch.Tensor
    void: torch.Tensor


def ground_truth_masks(
    semantic: torch.Tensor,
    instance: torch.Tensor,
    thing_classes: Sequence[int],
    ignore_index: int | None = 255,
) -> GroundTruthMasks:
    """One mask per thing instance (instance >= 1) and one per present stuff class."""
    things = torch.isin(semantic, torch.as_tensor(list(thing_classes), dtype=semantic.dtype))
    void = things & (instance == 0)
    if ignore_index is not None:
        void |= semantic == ignore_index
    keys = torch.stack([semantic, torch.where(things, instance, 0)], -1)[~void]
    keys = torch.unique(keys, dim=0)
    masks = (
        torch.stack(
            [
                (semantic == c) & (torch.where(things, instance, 0) == i) & ~void
                for c, i in keys.tolist()
            ]
        )
        if len(keys)
        else torch.zeros(0, *semantic.shape, dtype=torch.bool)
    )
    is_thing = torch.isin(keys[:, 0], torch.as_tensor(list(thing_classes), dtype=keys.dtype))
    return GroundTruthMasks(masks.to(torch.float32), keys[:, 0].long(), is_thing, void)


def dice(gt: torch.Tensor, pred: torch.Tensor, void: torch.Tensor) -> torch.Tensor:
    """``(K, N)`` Dice of ground-truth masks ``(K, H, W)`` and soft masks ``(N, H, W)``,
    void pixels zeroed in both, smoothing 1."""
    keep = (~void).to(pred.dtype).reshape(1, -1)
    g = gt.reshape(gt.shape[0], -1).to(pred.dtype) * keep
    p = pred.reshape(pred.shape[0], -1) * keep
    inter = g @ p.T
    return (2 * inter + DICE_SMOOTH) / (g.sum(1)[:, None] + p.sum(1)[None, :] + DICE_SMOOTH)


def hungarian_match(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gt indices, slot indices)`` of the one-to-one matching maximising the total of
    ``similarity`` ``(K, N)`` (``min(K, N)`` pairs)."""
    optimize = require("scipy", "MaX-DeepLab's Hungarian matching").optimize
    rows, cols = optimize.linear_sum_assignment(similarity.detach().cpu().numpy(), maximize=True)
    return torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)


@dataclass(frozen=True)
class PQLoss:
    """``loss`` = L_PQ (eq. 4.12), its ``positive`` and ``negative`` sums, and the
    matching ``gt_index`` → ``slot_index``."""

    loss: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    gt_index: torch.Tensor
    slot_index: torch.Tensor


def pq_style_loss(
    mask_logits: torch.Tensor,
    class_logits: torch.Tensor,
    target: GroundTruthMasks,
    alpha: float = ALPHA,
) -> PQLoss:
    """MaX-DeepLab's PQ-style loss of one image.

    Args:
        mask_logits: ``(N, H, W)``; the masks are their softmax over the N slots.
        class_logits: ``(N, C + 1)``; the last class is ∅.
        target: the image's :class:`GroundTruthMasks` (at the masks' resolution).
    """
    n = mask_logits.shape[0]
    masks = mask_logits.softmax(dim=0)
    log_p = class_logits.log_softmax(dim=-1)
    d = dice(target.masks, masks, target.void)  # (K, N)
    p_correct = log_p[:, target.classes].T.exp()  # (K, N): p̂_j(c_i)
    gt_index, slot_index = hungarian_match(p_correct * d)
    d_pos = d[gt_index, slot_index]
    p_pos = p_correct[gt_index, slot_index]
    log_pos = log_p[slot_index, target.classes[gt_index]]
    positive = (p_pos.detach() * (1 - d_pos) + d_pos.detach() * -log_pos).sum()
    unmatched = torch.ones(n, dtype=torch.bool)
    unmatched[slot_index] = False
    negative = -log_p[unmatched, -1].sum()
    loss = (alpha * positive + (1 - alpha) * negative) / n
    return PQLoss(loss, positive, negative, gt_index, slot_index)


def instance_discrimination(
    features: torch.Tensor, target: GroundTruthMasks, tau: float = TAU
) -> torch.Tensor:
    """Eq. 4.16-4.17: each thing-instance pixel's feature ``g`` ``(D, H, W)`` must pick
    its own mask's normalised mean feature among the K masks' (softmax at τ); mean over
    those pixels (0 if there are none)."""
    g = features.reshape(features.shape[0], -1)  # (D, HW)
    m = target.masks.reshape(target.masks.shape[0], -1).to(g.dtype)  # (K, HW)
    t = F.normalize(m @ g.T, dim=-1)  # (K, D)
    logits = (t @ g) / tau  # (K, HW)
    pixels = (m[target.is_thing].sum(0) > 0) & ~target.void.reshape(-1)
    if not pixels.any():
        return features.sum() * 0.0
    log_prob = logits.log_softmax(dim=0)  # over the K masks
    own = (m * log_prob.exp()).sum(0).clamp_min(1e-30).log()  # log Σ_i m_i softmax_i
    return -own[pixels].mean()


def mask_id_cross_entropy(
    mask_logits: torch.Tensor,
    target: GroundTruthMasks,
    gt_index: torch.Tensor,
    slot_index: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy over slots: a pixel of ground-truth mask ``i`` should pick the slot
    matched to ``i``; void pixels and pixels of unmatched masks are left out."""
    labels = torch.full(target.void.shape, -1, dtype=torch.int64)
    for i, j in zip(gt_index.tolist(), slot_index.tolist()):
        labels[target.masks[i] > 0] = j
    labels[target.void] = -1
    if not (labels >= 0).any():
        return mask_logits.sum() * 0.0
    return F.cross_entropy(mask_logits[None], labels[None], ignore_index=-1)


def semantic_cross_entropy(
    logits: torch.Tensor, semantic: torch.Tensor, ignore_index: int = 255
) -> torch.Tensor:
    """The auxiliary semantic loss: per-pixel cross-entropy of ``(C, H, W)`` logits."""
    return F.cross_entropy(logits[None], semantic[None], ignore_index=ignore_index)
