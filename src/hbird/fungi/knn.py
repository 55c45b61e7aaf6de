"""kNN classification and retrieval with cosine similarity (the paper's evaluation, §4).

Features are L2-normalised here, so the inner product the index ranks by is the cosine
similarity. Two votes over the ``k`` nearest training samples:

* ``"majority"``: the most frequent label; ties go to the class with the larger summed
  similarity, then to the smaller class id;
* ``"softmax"``: each neighbour votes ``exp(sim / T)`` for its label (DINO's weighted kNN).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from hbird.errors import InputError
from hbird.index import create_index
from hbird.io.seeds import make_generator
from hbird.metrics import knn_accuracy

VOTES = ("majority", "softmax")


def _as_features(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.ndim != 2:
        raise InputError(f"{what} must be (N, D) features, got shape {tuple(x.shape)}")
    return F.normalize(x.detach().to(torch.float32).cpu(), dim=-1)


def nearest_neighbours(
    train_features: torch.Tensor,
    query_features: torch.Tensor,
    k: int,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine ``sims (M, k')`` and ``ids (M, k')`` of the nearest training features, ``k' = min(k, N)``.

    Exact search, run on ``device`` (a GPU turns ImageNet-sized kNN from an hour of CPU
    time into seconds); results come back on the CPU.
    """
    train = _as_features(train_features, "train_features")
    query = _as_features(query_features, "query_features")
    if train.shape[1] != query.shape[1]:
        raise InputError(
            f"train features have dimension {train.shape[1]} but queries {query.shape[1]}"
        )
    index = create_index("exact", train.shape[1], device=device)
    index.add(train)
    return index.search(query, min(k, train.shape[0]))


def vote(
    sims: torch.Tensor,
    neighbour_labels: torch.Tensor,
    num_classes: int,
    method: str = "majority",
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores ``(M, C)`` from neighbour similarities and labels, both ``(M, k)``.

    ``argmax`` of the scores is the prediction under ``method`` (see the module docs).
    """
    if method not in VOTES:
        raise ValueError(f"vote must be one of {VOTES}, got {method!r}")
    sims = sims.to(torch.float64)
    labels = neighbour_labels.long()
    m, k = labels.shape
    if method == "softmax":
        weights = torch.exp((sims - sims.max(dim=1, keepdim=True).values) / temperature)
        return torch.zeros(m, num_classes, dtype=torch.float64).scatter_add_(1, labels, weights)
    counts = torch.zeros(m, num_classes, dtype=torch.float64).scatter_add_(
        1, labels, torch.ones_like(sims)
    )
    summed = torch.zeros(m, num_classes, dtype=torch.float64).scatter_add_(1, labels, sims)
    # a count difference of 1 outweighs any summed-similarity difference (|sum| <= k)
    return counts * (2 * k + 1) + summed


def knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    query_features: torch.Tensor,
    k: int = 20,
    method: str = "majority",
    temperature: float = 0.07,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Predicted labels ``(M,)`` of ``query_features (M, D)`` by cosine kNN on ``(N, D)``."""
    labels = torch.as_tensor(train_labels).long().reshape(-1)
    if labels.numel() != train_features.shape[0]:
        raise InputError(f"{labels.numel()} labels for {train_features.shape[0]} training features")
    num_classes = num_classes or int(labels.max()) + 1
    sims, ids = nearest_neighbours(train_features, query_features, k, device)
    scores = vote(sims, labels[ids], num_classes, method, temperature)
    return scores.argmax(dim=1)


def kshot_indices(labels: torch.Tensor, shots: int, seed: int = 0) -> torch.Tensor:
    """Indices of ``shots`` samples per class (all of a class that has fewer), seeded, sorted."""
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    labels = torch.as_tensor(labels).long().reshape(-1)
    order = torch.randperm(labels.numel(), generator=make_generator(seed, "kshot", shots))
    chosen = []
    for c in torch.unique(labels).tolist():
        members = order[labels[order] == c]
        chosen.append(members[:shots])
    return torch.sort(torch.cat(chosen)).values


def knn_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 20,
    votes: Sequence[str] = VOTES,
    temperature: float = 0.07,
    device: str | torch.device = "cpu",
) -> dict[str, dict[str, float]]:
    """``{vote: {"top1": ..., "mean_per_class": ...}}`` of cosine kNN on a test split."""
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    sims, ids = nearest_neighbours(train_features, test_features, k, device)
    results = {}
    for method in votes:
        scores = vote(sims, train_labels[ids], num_classes, method, temperature)
        results[method] = knn_accuracy(scores.argmax(dim=1), test_labels)
    return results


def average_precision(relevant: torch.Tensor) -> torch.Tensor:
    """AP per row of a ranked relevance matrix ``(M, N)`` (bool); rows without hits give NaN."""
    hits = relevant.to(torch.float64)
    ranks = torch.arange(1, hits.shape[1] + 1, dtype=torch.float64)
    precision_at_hit = torch.cumsum(hits, dim=1) / ranks * hits
    return precision_at_hit.sum(dim=1) / hits.sum(dim=1)


def retrieval_map(
    query_features: torch.Tensor,
    query_labels: torch.Tensor,
    gallery_features: torch.Tensor,
    gallery_labels: torch.Tensor,
    chunk_size: int = 1024,
) -> float:
    """Mean average precision of ranking the gallery by cosine similarity to each query.

    A gallery item is relevant when it has the query's label; ties in similarity are
    ranked by gallery order. Queries with no relevant item are left out of the mean.
    """
    query = _as_features(query_features, "query_features")
    gallery = _as_features(gallery_features, "gallery_features")
    q_labels = torch.as_tensor(query_labels).long().reshape(-1)
    g_labels = torch.as_tensor(gallery_labels).long().reshape(-1)
    if q_labels.numel() != query.shape[0] or g_labels.numel() != gallery.shape[0]:
        raise InputError("retrieval_map: one label per query and per gallery item is needed")
    aps = []
    for start in range(0, query.shape[0], chunk_size):
        sims = query[start : start + chunk_size] @ gallery.T  # (m, N)
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices
        relevant = g_labels[order] == q_labels[start : start + chunk_size, None]
        aps.append(average_precision(relevant))
    ap = torch.cat(aps)
    ap = ap[~torch.isnan(ap)]
    if ap.numel() == 0:
        raise InputError("retrieval_map: no query has a relevant gallery item")
    return float(ap.mean())
