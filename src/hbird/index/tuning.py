"""Choose an approximate index's search settings for a target recall, measured on its keys.

After a build, a seeded sample of the keys is searched exactly (``ExactIndex``, key chunk
by key chunk, so keys that arrive in pieces never need to be in memory at once) and with
the built index at a ladder of settings; the cheapest setting whose ``recall_at_k``
reaches the target wins. Recall only grows with ``nprobe`` (more lists scanned) and with
``k_factor`` (more candidates re-ranked exactly), so for each ``nprobe`` the smallest
sufficient ``k_factor`` is found by walking down from the previous one.

Each sampled key is held out of its own answer: a query from outside the bank never
finds itself, so the exact and the approximate search are both asked for one neighbour
more and the query's own key is dropped from each (``drop_own``). Keys as queries are
otherwise drawn like the bank's keys, which is what a query image's patches are one by
one: the recall of a query does not depend on the other queries searched with it (each
has its own lists and candidates), so patches correlated within an image change how fast
a search is, not its expected recall (measured in docs/performance.md, "At 1M keys").
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

from hbird.errors import InputError
from hbird.index.base import VectorIndex, as_key_matrix
from hbird.index.exact import ExactIndex, merge_top_k
from hbird.index.recall import recall_at_k

RECALL_K = 30
"""Neighbours per query the recall is measured at (the paper's k, §4)."""

NPROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""The default ``nprobe`` ladder (IVF-PQ's)."""
FINE_NPROBES = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64)
FINE_NPROBES += (80, 96, 112, 128, 160, 192, 224, 256)
"""Every count to 8, then four steps per octave: for backends whose search costs about
``nprobe`` (``ivfmm``: at 1M × 768 the held-out recall@30 is 0.918 at nprobe 3, which the
power-of-two ladder skipped for 4, a third more lists)."""
K_FACTORS = (1, 2, 4, 8, 16, 32, 64)
TUNER_VERSION = 2
"""Recorded as ``tuned_by`` by backends that save it; an index tuned by another version is
rebuilt on a cache hit rather than reused with its old setting (1: no hold-out, powers of
two only; 2: own key held out, ``tuning_nprobes``)."""


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


def drop_own(ids: torch.Tensor, own: torch.Tensor) -> torch.Tensor:
    """``ids (S, k + 1)`` without each row's own id ``own (S,)``, or without its last
    column where the own id is absent: ``(S, k)``, order kept."""
    is_own = ids == own[:, None]
    last = torch.full_like(own, ids.shape[1] - 1)
    drop = torch.where(is_own.any(dim=1), is_own.to(torch.int8).argmax(dim=1), last)
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[torch.arange(ids.shape[0]), drop] = False
    return ids[keep].view(ids.shape[0], ids.shape[1] - 1)


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
    sample of ``queries`` of the ``n`` keys, each held out of its own answer (``drop_own``),
    reaches ``target``; the best found (with a warning) if none does. ``nprobe`` steps
    through the index's ``tuning_nprobes`` (default ``NPROBES``). ``index`` is an IVF index
    (``nlist``, ``m``, ``nprobe`` and ``k_factor`` attributes); its settings are left as
    they were."""
    if n < 2:
        raise InputError(f"tuning the {index.kind} index for recall needs at least 2 keys")
    rows = sample_rows(n, queries, seed)
    sample = gather_rows(chunks(), rows, index.dim)  # (S, D)
    k = min(RECALL_K, n - 1)
    truth = drop_own(exact_ids(sample, chunks(), k + 1), rows)  # (S, k)
    before = index.nprobe, index.k_factor
    measured: dict[tuple[int, int], float] = {}

    def recall(nprobe: int, k_factor: int) -> float:
        if (nprobe, k_factor) not in measured:
            index.nprobe, index.k_factor = nprobe, k_factor
            found = drop_own(index.search(sample, k + 1)[1], rows)
            measured[nprobe, k_factor] = recall_at_k(found, truth)
        return measured[nprobe, k_factor]

    def cost(setting: tuple[int, int]) -> float:
        if hasattr(index, "search_cost"):  # a backend that knows its own cost
            return index.search_cost(*setting, n)
        return estimated_cost(*setting, n, index.nlist, index.m, index.dim)

    best: tuple[int, int] | None = None
    j = len(K_FACTORS) - 1
    try:
        ladder = getattr(index, "tuning_nprobes", NPROBES)
        for nprobe in [p for p in ladder if p < index.nlist] + [index.nlist]:
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
    if hasattr(index, "tuned_by"):
        index.tuned_by = TUNER_VERSION
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
        if wanted.recall is not None:  # keep the settings tuned for it, by this tuner
            return wanted.recall == self.recall and self._tuned_by() == TUNER_VERSION
        self.nprobe, self.k_factor = wanted.nprobe, wanted.k_factor
        self.recall = self.measured_recall = None
        return True

    def _tuned_by(self) -> int | None:
        """The tuner version of the kept setting (backends that do not record it: this one)."""
        return getattr(self, "tuned_by", TUNER_VERSION)

    def _built(self, chunks: Callable[[], Iterable[torch.Tensor]], n: int, progress: bool) -> None:
        tune_after_build(self, chunks, n, progress)  # type: ignore[arg-type]
