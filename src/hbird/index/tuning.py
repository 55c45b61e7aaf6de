"""Choose an approximate index's search settings for a target recall, measured on its keys.

After a build, a seeded sample of the keys is searched exactly (``ExactIndex``, key chunk
by key chunk, so keys that arrive in pieces never need to be in memory at once) and with
the built index at a ladder of settings; the cheapest setting whose ``recall_at_k``
reaches the target wins. Recall only grows with ``nprobe`` (more lists scanned) and with
``k_factor`` (more candidates re-ranked exactly), so for each ``nprobe`` the smallest
sufficient ``k_factor`` is found by walking down from the previous one.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from tqdm.auto import tqdm

from hbird.index.base import VectorIndex, as_key_matrix
from hbird.index.exact import ExactIndex, merge_top_k
from hbird.index.recall import recall_at_k

RECALL_K = 30
"""Neighbours per query the recall is measured at (the paper's k, §4)."""

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
K_FACTORS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Tuned:
    """The chosen setting and the recall@``RECALL_K`` it measured on the sample."""

    nprobe: int
    k_factor: int
    recall: float
    reached: bool


def sample_rows(n: int, count: int, seed: int) -> torch.Tensor:
    """Sorted ids of a seeded sample of ``min(count, n)`` of ``n`` rows."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=generator)[:count].sort().values


def gather_rows(chunks: Iterable[torch.Tensor], rows: torch.Tensor, dim: int) -> torch.Tensor:
    """The keys at sorted ``rows`` of keys arriving in ``(n_i, D)`` pieces: ``(len(rows), D)``."""
    picked, start = [], 0
    for chunk in chunks:
        chunk = as_key_matrix(chunk, dim, "tuning sample")
        stop = start + chunk.shape[0]
        lo, hi = torch.searchsorted(rows, torch.tensor([start, stop])).tolist()
        picked.append(chunk[rows[lo:hi] - start].to(torch.float32))
        start = stop
    return torch.cat(picked)


def exact_ids(queries: torch.Tensor, chunks: Iterable[torch.Tensor], k: int) -> torch.Tensor:
    """Exact top-``k`` ids ``(M, k)`` of ``queries (M, D)`` over keys arriving in pieces."""
    best_sims = torch.full((queries.shape[0], k), float("-inf"))
    best_ids = torch.full((queries.shape[0], k), -1, dtype=torch.int64)
    offset = 0
    for chunk in chunks:
        if chunk.shape[0] == 0:
            continue
        sims, ids = ExactIndex(queries.shape[1]).fill(chunk).search(queries, k)
        best_sims, best_ids = merge_top_k(best_sims, best_ids, sims, ids + offset)
        offset += chunk.shape[0]
    return best_ids


def estimated_cost(nprobe: int, k_factor: int, n: int, nlist: int, m: int, dim: int) -> float:
    """Rough bytes touched per query: PQ fast-scan codes of ``nprobe`` lists (``m / 2``
    bytes a key) plus ``RECALL_K · k_factor`` float16 re-ranking rows, weighted 4× for
    their random access."""
    return nprobe * (n / nlist) * m / 2 + 4 * RECALL_K * k_factor * dim * 2


def tune_nprobe_k_factor(
    index: VectorIndex,
    chunks: Callable[[], Iterable[torch.Tensor]],
    n: int,
    target: float,
    queries: int,
    seed: int,
) -> Tuned:
    """The cheapest (``estimated_cost``) ``nprobe``/``k_factor`` whose recall@30 on a seeded
    sample of ``queries`` of the ``n`` keys reaches ``target``; the best found (with a
    warning) if none does. ``index`` is an IVF index (``nlist``, ``m``, ``nprobe`` and
    ``k_factor`` attributes); its settings are left as they were."""
    rows = sample_rows(n, queries, seed)
    sample = gather_rows(chunks(), rows, index.dim)  # (S, D)
    k = min(RECALL_K, n)
    truth = exact_ids(sample, chunks(), k)  # (S, k)
    before = index.nprobe, index.k_factor
    measured: dict[tuple[int, int], float] = {}

    def recall(nprobe: int, k_factor: int) -> float:
        if (nprobe, k_factor) not in measured:
            index.nprobe, index.k_factor = nprobe, k_factor
            measured[nprobe, k_factor] = recall_at_k(index.search(sample, k)[1], truth)
        return measured[nprobe, k_factor]

    def cost(setting: tuple[int, int]) -> float:
        if hasattr(index, "search_cost"):  # a backend that knows its own cost
            return index.search_cost(*setting, n)
        return estimated_cost(*setting, n, index.nlist, index.m, index.dim)

    best: tuple[int, int] | None = None
    j = len(K_FACTORS) - 1
    try:
        for nprobe in [p for p in NPROBES if p < index.nlist] + [index.nlist]:
            if recall(nprobe, K_FACTORS[j]) < target:
                continue  # not even the most candidates that sufficed so far
            while j > 0 and recall(nprobe, K_FACTORS[j - 1]) >= target:
                j -= 1
            if best is None or cost((nprobe, K_FACTORS[j])) < cost(best):
                best = nprobe, K_FACTORS[j]
            if j == 0:
                break  # more lists can only cost more
    finally:
        index.nprobe, index.k_factor = before
    if best is not None:
        return Tuned(*best, measured[best], True)
    top = max(measured, key=lambda setting: (measured[setting], -cost(setting)))
    warnings.warn(
        f"the {index.kind} index reaches recall@{k} {measured[top]:.3f} at best (nprobe "
        f"{top[0]}, k_factor {top[1]}), below the target {target}; build it with more "
        "lists or larger codes, or use the exact index",
        stacklevel=3,
    )
    return Tuned(*top, measured[top], False)


def tune_after_build(
    index: VectorIndex, chunks: Callable[[], Iterable[torch.Tensor]], n: int, progress: bool
) -> None:
    """The ``_built`` hook of an IVF index with a target ``recall`` (``None``: nothing to
    do): tune its ``nprobe``/``k_factor`` on its keys and record ``measured_recall``."""
    if index.recall is None:
        return
    start = time.perf_counter()
    tuned = tune_nprobe_k_factor(index, chunks, n, index.recall, index.recall_queries, index.seed)
    index.nprobe, index.k_factor = tuned.nprobe, tuned.k_factor
    index.measured_recall = round(tuned.recall, 4)
    if progress:
        tqdm.write(
            f"tuned for recall@30 >= {index.recall}: nprobe {index.nprobe}, k_factor "
            f"{index.k_factor}, measured {index.measured_recall} on {index.recall_queries} "
            f"keys ({time.perf_counter() - start:.1f} s)",
            file=sys.stderr,
        )


class TunedSearch:
    """Mixin for IVF backends tuned for a target recall after the build: ``nprobe``,
    ``k_factor`` and the target ``recall`` are search-time settings (no part of a cache
    fingerprint), the recall measured is recorded, not given, and ``expected_size`` sizes
    ``nlist``. Put it before ``VectorIndex`` in the bases."""

    search_time_params: ClassVar[tuple[str, ...]] = ("nprobe", "k_factor", "recall")
    measured_params: ClassVar[tuple[str, ...]] = ("measured_recall",)
    uses_expected_size: ClassVar[bool] = True

    def take_search_settings(self, wanted: Any) -> bool:
        """Given ``nprobe``/``k_factor`` replace tuned ones (and their measured recall);
        a wanted target recall is served only by an index tuned for that target."""
        assert isinstance(wanted, type(self))
        if wanted.recall is not None:
            return wanted.recall == self.recall  # keep the settings tuned for it
        self.nprobe, self.k_factor = wanted.nprobe, wanted.k_factor
        self.recall = self.measured_recall = None
        return True

    def _built(self, chunks: Callable[[], Iterable[torch.Tensor]], n: int, progress: bool) -> None:
        tune_after_build(self, chunks, n, progress)  # type: ignore[arg-type]
