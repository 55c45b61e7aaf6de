"""ReCo's co-segmentation and its pixel weights (issue 11, steps 4-7; supplement Alg. 1).

Shapes: an archive's features are ``F (k, h, w, D)``, channel-normalised patch features of
``k`` images; pixel weights ``w (k, h, w)`` lie in [0, 1]. With ``X = F`` flattened to
``(k·h·w, D)`` rows, ``A = X Xᵀ`` and the weights multiply the columns of ``A``:

    G[r, i] = max over the pixels j of image i of A[r, j] · w[j]
    s[r]    = mean over images i of G[r, i]

The seed of image ``i`` is its pixel with the largest ``s`` (``n_seeds`` of them allowed),
and the reference is the normalised mean of the seed features. ``A`` is computed in row
chunks: at most ``chunk_rows × k·h·w`` values exist at once.

Algorithm 1 slices ``A[:, start:start+end]`` where ``A[:, start:end]`` is meant, so its
max for image ``i`` runs over the columns of images ``i … 2i`` (clipped at the last
image). ``official_grid=True`` reproduces that; the default is the correct slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

CHUNK_ROWS = 1024
"""Rows of ``A`` per chunk: k = 50 images of 14×14 patches make 9800 columns, so a chunk
is 40 MB in float32."""


def _check_features(features: torch.Tensor) -> tuple[int, int, int, int]:
    if features.ndim != 4:
        raise ValueError(f"archive features must be (k, h, w, D), got {tuple(features.shape)}")
    return tuple(features.shape)


def affinity_grid(
    features: torch.Tensor,
    weights: torch.Tensor | None = None,
    chunk_rows: int = CHUNK_ROWS,
    official_grid: bool = False,
) -> torch.Tensor:
    """``G (k·h·w, k)``: for every pixel row ``r``, the largest weighted affinity to each
    image (Alg. 1, "grid"). ``features (k, h, w, D)`` normalised; ``weights (k, h, w)``
    multiply the columns of ``A`` (None: all ones)."""
    k, h, w, d = _check_features(features)
    hw, n = h * w, k * h * w
    x = features.reshape(n, d).float()
    col_w = None if weights is None else weights.reshape(n).to(x)
    grid = torch.empty(n, k, dtype=x.dtype, device=x.device)
    for start in range(0, n, max(1, int(chunk_rows))):
        rows = x[start : start + chunk_rows] @ x.T  # (chunk, k·h·w): this chunk of A
        if col_w is not None:
            rows = rows * col_w
        if official_grid:
            for i in range(k):  # A[:, start_col : start_col + end_col], as Alg. 1 writes it
                grid[start : start + len(rows), i] = rows[:, i * hw : (2 * i + 1) * hw].amax(1)
        else:
            grid[start : start + len(rows)] = rows.view(len(rows), k, hw).amax(-1)
    return grid


def seed_scores(grid: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """``s = mean_i G[:, i]`` as ``(k, h, w)``."""
    return grid.mean(dim=1).view(shape)


def select_seeds(scores: torch.Tensor, n_seeds: int = 1) -> torch.Tensor:
    """``scores (k, h, w)`` → ``(k, n_seeds)`` flat pixel indices (``y · w + x``) of the
    largest scores in each image, best first."""
    k, h, w = scores.shape
    if not 1 <= n_seeds <= h * w:
        raise ValueError(f"n_seeds must be between 1 and {h * w} (pixels per image), got {n_seeds}")
    return scores.reshape(k, h * w).topk(n_seeds, dim=1).indices


def seed_reference(features: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """The unit-norm mean of the seed features: ``features (k, h, w, D)``, ``seeds (k, n)``
    → ``(D,)``."""
    k, h, w, d = _check_features(features)
    flat = features.reshape(k, h * w, d).float()
    picked = torch.gather(flat, 1, seeds[..., None].expand(-1, -1, d))  # (k, n, D)
    return F.normalize(picked.reshape(-1, d).mean(0), dim=0)


@dataclass(frozen=True)
class Cosegmentation:
    """One archive's co-segmentation: ``reference (D,)``, ``seeds (k, n_seeds)`` flat
    indices, ``scores (k, h, w)`` (``s``)."""

    reference: torch.Tensor
    seeds: torch.Tensor
    scores: torch.Tensor


def cosegment(
    features: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_seeds: int = 1,
    chunk_rows: int = CHUNK_ROWS,
    official_grid: bool = False,
) -> Cosegmentation:
    """Co-segment an archive: ``features (k, h, w, D)`` normalised, ``weights (k, h, w)``."""
    k, h, w, _ = _check_features(features)
    grid = affinity_grid(features, weights, chunk_rows, official_grid)
    scores = seed_scores(grid, (k, h, w))
    seeds = select_seeds(scores, n_seeds)
    return Cosegmentation(seed_reference(features, seeds), seeds, scores)


def language_weights(
    dense: torch.Tensor, text: torch.Tensor, size: tuple[int, int], scale: float = 10.0
) -> torch.Tensor:
    """Step 5: ``σ(scale · ⟨DenseCLIP, t_c⟩)`` from ``dense (k, h', w', E)`` (normalised)
    and ``text (E,)``, bilinearly resized to ``size = (h, w)`` → ``(k, h, w)`` in [0, 1]."""
    logits = torch.einsum("bhwe,e->bhw", dense.float(), text.float().to(dense.device))
    weights = torch.sigmoid(scale * logits)[:, None]
    if tuple(weights.shape[-2:]) != tuple(size):
        weights = F.interpolate(weights, size=size, mode="bilinear", align_corners=False)
    return weights[:, 0]


def context_weights(
    features: torch.Tensor, context_refs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Step 6: ``Π_q (1 − σ(⟨F, ref_q⟩ / τ))`` → ``(k, h, w)`` in [0, 1], from
    ``features (k, h, w, D)`` and ``context_refs (Q, D)`` (no contexts: all ones)."""
    k, h, w, _ = _check_features(features)
    if len(context_refs) == 0:
        return torch.ones(k, h, w, device=features.device)
    sims = torch.einsum("bhwd,qd->bhwq", features.float(), context_refs.float().to(features.device))
    return (1 - torch.sigmoid(sims / temperature)).prod(dim=-1)


def class_scores(features: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Step 7: ``S_c = σ(⟨F, ref_c⟩)`` for ``features (h, w, D)`` normalised and
    ``references (C, D)`` → ``(C, h, w)``."""
    return torch.sigmoid(torch.einsum("hwd,cd->chw", features.float(), references.float()))


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(C, h, w)`` → ``(C, H, W)`` bilinear."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
