"""Decoding: eq. 1 of Balazevic et al. (2023), then upsampling to the query's size.

For a query patch feature ``q`` and its ``k`` retrieved memory entries with keys
``k_i`` and values ``v_i`` (§3.1, eq. 1)::

    ŷ = Σ_i softmax_i( cos(q, k_i) / β ) · v_i

The patch-level soft labels ``(h, w, C)`` are bilinearly upsampled to the query
image's original size ``(H, W)``; segmentation takes the argmax (confidence = the
winning class's upsampled weight), regression takes the values themselves
(confidence = the softmax weight of the closest neighbour, upsampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def neighbour_attention(
    queries: torch.Tensor,
    neighbour_keys: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weights of eq. 1.

    Args:
        queries: ``(Q, D)`` query patch features (normalised here).
        neighbour_keys: ``(Q, k, D)`` keys of each query's neighbours (normalised here).
        temperature: β > 0.
        valid: optional ``(Q, k)`` bool; False entries (padding) get zero weight.

    Returns:
        ``(Q, k)`` float32 weights summing to 1 over ``k``.
    """
    q = F.normalize(queries.to(torch.float32), dim=-1)
    keys = F.normalize(neighbour_keys.to(torch.float32), dim=-1)
    cosines = torch.einsum("qd,qkd->qk", q, keys)  # (Q, k)
    return softmax_over_neighbours(cosines, temperature, valid)


def softmax_over_neighbours(
    cosines: torch.Tensor, temperature: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 1's weights from the cosines themselves: ``softmax_k(cos / β)``.

    Args:
        cosines: ``(Q, k)`` cosine similarity of each query to each of its neighbours.
        temperature: β > 0.
        valid: optional ``(Q, k)`` bool; False entries (padding) get zero weight.

    Returns:
        ``(Q, k)`` float32 weights summing to 1 over ``k``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cosines.to(torch.float32) / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def aggregate(weights: torch.Tensor, neighbour_values: torch.Tensor) -> torch.Tensor:
    """``(Q, k)`` weights × ``(Q, k, C)`` values → ``(Q, C)`` soft labels."""
    return torch.einsum("qk,qkc->qc", weights, neighbour_values.to(torch.float32))


def upsample(patch_labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(h, w, C)`` patch-level labels → ``(C, H, W)`` by bilinear interpolation."""
    x = patch_labels.permute(2, 0, 1)[None].to(torch.float32)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]


@dataclass
class DensePrediction:
    """One query image's prediction at its original size.

    Attributes:
        labels: ``(H, W)`` int64 class ids (segmentation) or ``(H, W)`` / ``(H, W, C)``
            float32 values (depth, regression).
        confidence: ``(H, W)`` float32 in [0, 1].
        patch_labels: ``(h, w, C)`` the soft labels before upsampling.
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    patch_labels: torch.Tensor


def decode_dense(
    patch_labels: torch.Tensor,
    size: tuple[int, int],
    classification: bool,
    patch_confidence: torch.Tensor | None = None,
) -> DensePrediction:
    """Upsample ``(h, w, C)`` soft labels to ``size`` and read off labels and confidence.

    Args:
        patch_labels: ``(h, w, C)`` eq.-1 outputs.
        size: the query's original ``(H, W)``.
        classification: argmax over classes if True, else values.
        patch_confidence: ``(h, w)`` per-patch confidence for regression (e.g. top weight).
    """
    up = upsample(patch_labels, size)  # (C, H, W)
    if classification:
        confidence, labels = up.max(dim=0)
        return DensePrediction(labels.to(torch.int64), confidence, patch_labels)
    values = up[0] if up.shape[0] == 1 else up.permute(1, 2, 0)
    if patch_confidence is None:
        confidence = torch.ones(size, dtype=torch.float32)
    else:
        confidence = upsample(patch_confidence[..., None], size)[0]
    return DensePrediction(values.contiguous(), confidence, patch_labels)
