"""Clustered unit vectors: structured test and benchmark data for the indexes.

Uniform random unit vectors in many dimensions are nearly orthogonal, so every
neighbour list is noise and recall numbers mean little. Real patch features cluster;
these vectors do too: Gaussian blobs around random unit centres, renormalised.
"""

from __future__ import annotations

import torch


def blob_centers(n_clusters: int, dim: int, centers_seed: int) -> torch.Tensor:
    """The ``(n_clusters, dim)`` unit centres both generators below draw around."""
    generator = torch.Generator().manual_seed(centers_seed)
    return torch.nn.functional.normalize(torch.randn(n_clusters, dim, generator=generator), dim=1)


def clustered_unit_vectors(
    n: int,
    dim: int = 64,
    n_clusters: int = 50,
    spread: float = 0.75,
    seed: int = 0,
    centers_seed: int = 1234,
) -> torch.Tensor:
    """``n`` L2-normalised vectors ``(n, dim)`` float32 drawn around ``n_clusters`` centres.

    Args:
        spread: noise norm relative to the unit centre (0.5 → neighbours have cosine
            ~0.85, 1.0 → ~0.65).
        seed: draws the points; use another seed for queries from the same distribution.
        centers_seed: draws the centres; keep it fixed to share the distribution.
    """
    centers = blob_centers(n_clusters, dim, centers_seed)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_clusters, (n,), generator=gen)
    noise = torch.randn(n, dim, generator=gen) * (spread / dim**0.5)
    return torch.nn.functional.normalize(centers[labels] + noise, dim=1)


def clustered_queries(
    count: int,
    dim: int = 64,
    n_clusters: int = 50,
    blobs: int = 8,
    spread: float = 0.75,
    seed: int = 7,
    centers_seed: int = 1234,
) -> torch.Tensor:
    """``count`` queries ``(count, dim)`` float32 like the patches of one image: drawn from
    only ``blobs`` (seeded) of the ``n_clusters`` blobs of ``clustered_unit_vectors`` with
    the same ``dim``, ``spread`` and ``centers_seed``, so together they probe few lists."""
    centers = blob_centers(n_clusters, dim, centers_seed)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n_clusters, generator=gen)[:blobs]
    labels = chosen[torch.randint(0, blobs, (count,), generator=gen)]
    noise = torch.randn(count, dim, generator=gen) * (spread / dim**0.5)
    return torch.nn.functional.normalize(centers[labels] + noise, dim=1)
