"""IVF scored by matrix multiplication: one bf16 matmul per probed list, for all its queries.

The patches of one query image are correlated, so together they probe few inverted lists,
and each list is probed by many of them. ``MatmulIVFIndex`` exploits that: the keys are
clustered into ``nlist`` lists (spherical k-means in torch) and stored list by list; a
search assigns every query to its ``nprobe`` nearest centroids (float32), groups the
(query, list) pairs by list and scores each probed list once, against all the queries
that probe it, with one matmul (bf16 runs on AMX / AVX512-BF16 units at several times the
float32 rate). The lists hold bf16 *residuals* ``r = key - centroid``:
``q·key = q·c (float32, from the coarse step) + q·r (bf16)``, and ``r`` is small, so the
bf16 rounding error is a fraction of what it would be on the keys themselves.
A faiss heap per query keeps the ``k · k_factor`` best first-pass scores (faiss's C++
heaps: ``torch.topk`` costs more than the matmul here); these candidates are then scored
exactly against a copy of the keys as added (float16 or float32), and the best ``k``
returned, so the sims are exact inner products and recall is limited by the lists
scanned and the first pass's ordering only.

Queries that do not share lists (keys drawn as queries, as the tuner does) make every
list a small matmul: correct, but slower per query than IVF-PQ's fast-scan. Measured
against IVF-PQ in docs/performance.md ("At 1M keys: batched lists").
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from hbird._optional import require
from hbird.errors import InputError
from hbird.index.base import VectorIndex
from hbird.index.heaps import RowHeaps, id_codes
from hbird.index.tuning import FINE_NPROBES, RECALL_K, TunedSearch, sample_rows
from hbird.io.files import save_tensors

PAYLOAD_FILE = "ivf.safetensors"
ASSIGN_ROWS = 1 << 16
"""Keys assigned to their nearest centroid (or turned into residuals) per matmul."""
RESCORE_QUERIES = 16
"""Queries whose candidates are gathered and re-scored together."""


def default_matmul_nlist(n: int) -> int:
    """List count for ``n`` keys: about ``sqrt(n)``, at most ``n // 39``.

    Fewer, longer lists than IVF-PQ's ``4·sqrt(n)``: each list is one matmul, and the
    matmul's fixed cost per call is what a search of one image pays per probed list.
    """
    return max(1, min(round(math.sqrt(n)), n // 39))


def spherical_kmeans(x: torch.Tensor, nlist: int, iterations: int, seed: int) -> torch.Tensor:
    """Unit-norm centroids ``(nlist, D)`` float32 of ``x (n, D)``, ``n >= nlist``: seeded
    random rows, then ``iterations`` rounds of nearest-centroid assignment (inner product)
    and renormalised means. A list left empty restarts at a random row."""
    generator = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(x.shape[0], generator=generator)[:nlist]].float()
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    for _ in range(iterations):
        lists = nearest_centroid(x, centroids)
        sums = torch.zeros_like(centroids)
        for start in range(0, x.shape[0], ASSIGN_ROWS):
            part = slice(start, start + ASSIGN_ROWS)
            sums.index_add_(0, lists[part], x[part].float())
        empty = torch.bincount(lists, minlength=nlist) == 0
        restart = torch.randint(0, x.shape[0], (int(empty.sum()),), generator=generator)
        sums[empty] = x[restart].float()
        centroids = torch.nn.functional.normalize(sums, dim=1)
    return centroids


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``(n,)`` int64: the centroid of largest inner product with each row of ``x (n, D)``."""
    lists = torch.empty(x.shape[0], dtype=torch.int64)
    for start in range(0, x.shape[0], ASSIGN_ROWS):
        part = x[start : start + ASSIGN_ROWS].float()
        lists[start : start + part.shape[0]] = (part @ centroids.T).argmax(dim=1)
    return lists


def padded_size(n: int, smallest: int = 16) -> int:
    """``n`` rounded up to one of four steps per octave (at most 25% more, at least
    ``smallest``). Matmul shapes are padded to these: oneDNN builds a kernel per new shape
    (about 2 ms each here), so a search sees a few dozen shapes, not one per list."""
    if n <= smallest:
        return smallest
    step = max(1, 2 ** (math.ceil(math.log2(n)) - 3))
    return -(-n // step) * step


class MatmulIVFIndex(TunedSearch, VectorIndex):
    """IVF with bf16 residual scoring by batched matmuls and exact re-ranking (see module doc).

    Args:
        dim: key dimension ``D``.
        nlist: inverted lists; default ``default_matmul_nlist(expected_size or len(train set))``.
        nprobe: lists scanned per query. May be changed between searches.
        k_factor: first-pass candidates kept per wanted neighbour, re-scored exactly. The
            residual scores order well, so 1 (re-score only the ``k`` kept) is the
            default; raise it if near-ties matter. May be changed between searches.
        train_size: most training rows used; default ``64 · nlist``.
        iterations: k-means rounds.
        expected_size: number of keys the index will hold, to size ``nlist``.
        seed: seed for the training sample, the k-means start and the tuner's sample.
        recall: target recall@30 the build tunes ``nprobe``/``k_factor`` for (as
            ``FaissIVFPQIndex``'s, see ``index.tuning``); ``None`` keeps the given ones.
        recall_queries: keys searched to measure recall.
        measured_recall: recall@30 the build measured at the kept setting.
        tuned_by: ``index.tuning.TUNER_VERSION`` of that measurement (recorded, not given).
    """

    kind = "ivfmm"
    exact_scores = True  # candidates are re-scored against the keys as added
    measured_params = ("measured_recall", "tuned_by")
    tuning_nprobes = FINE_NPROBES  # a search costs about nprobe: every count is worth trying

    def __init__(
        self,
        dim: int,
        nlist: int | None = None,
        nprobe: int = 16,
        k_factor: int = 1,
        train_size: int | None = None,
        iterations: int = 10,
        expected_size: int | None = None,
        seed: int = 0,
        recall: float | None = None,
        recall_queries: int = 1000,
        measured_recall: float | None = None,
        tuned_by: int | None = None,
    ) -> None:
        super().__init__(dim)
        owner = "MatmulIVFIndex"
        for name, value, optional in (
            ("nlist", nlist, True),
            ("nprobe", nprobe, False),
            ("k_factor", k_factor, False),
            ("train_size", train_size, True),
            ("iterations", iterations, False),
            ("expected_size", expected_size, True),
            ("recall_queries", recall_queries, False),
        ):
            if optional and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{owner}: {name} must be an int >= 1, got {value!r}")
        if recall is not None and (
            isinstance(recall, bool) or not isinstance(recall, int | float) or not 0 < recall <= 1
        ):
            raise InputError(f"{owner}: recall must be a number in (0, 1], got {recall!r}")
        require(
            "faiss", "the 'ivfmm' index (its per-query heaps)"
        )  # a clear error now, not at search
        self.nlist = nlist
        self.nprobe = nprobe
        self.k_factor = k_factor
        self.train_size = train_size
        self.iterations = iterations
        self.expected_size = expected_size
        self.seed = seed
        self.recall = recall
        self.recall_queries = recall_queries
        self.measured_recall = measured_recall
        self.tuned_by = tuned_by
        self._centroids: torch.Tensor | None = None  # (nlist, D) float32
        self._keys = torch.empty(0, dim)  # (N, D) as added, list by list
        self._ids = torch.empty(0, dtype=torch.int64)  # (N,) insertion id of each stored key
        self._offsets = torch.zeros(1, dtype=torch.int64)  # list l is rows offsets[l]:[l+1]
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (keys, lists) not sorted in
        self._residuals: torch.Tensor | None = None  # (N + pad, D) bf16, built on first search
        self._ntotal = 0

    @property
    def ntotal(self) -> int:
        return self._ntotal

    @property
    def is_trained(self) -> bool:
        return self._centroids is not None

    def params(self) -> dict[str, Any]:
        return {
            "nlist": self.nlist,
            "nprobe": self.nprobe,
            "k_factor": self.k_factor,
            "train_size": self.train_size,
            "iterations": self.iterations,
            "expected_size": self.expected_size,
            "seed": self.seed,
            "recall": self.recall,
            "recall_queries": self.recall_queries,
            "measured_recall": self.measured_recall,
            "tuned_by": self.tuned_by,
        }

    def search_cost(self, nprobe: int, k_factor: int, n: int) -> float:
        """Rough bytes read per query (what the tuner ranks settings by): bf16 residuals of
        ``nprobe`` lists plus ``RECALL_K · k_factor`` re-scored rows, 4× for their random
        access."""
        return (
            nprobe * (n / (self.nlist or 1)) * self.dim * 2 + 4 * RECALL_K * k_factor * self.dim * 2
        )

    # --- building --------------------------------------------------------------------

    def training_rows(self, n: int) -> torch.Tensor | None:
        """A seeded sample of ``train_size`` (default ``64 · nlist``) of ``n`` rows, or all."""
        if self.nlist is None:
            self.nlist = default_matmul_nlist(self.expected_size or n)
        limit = self.train_size or 64 * self.nlist
        return None if n <= limit else sample_rows(n, limit, self.seed)

    def _train(self, x: torch.Tensor) -> None:
        if self._ntotal:
            raise InputError(
                f"MatmulIVFIndex already holds {self._ntotal} keys; training again would "
                "drop them. Train before the first add, or build a new index"
            )
        rows = self.training_rows(x.shape[0])  # sets nlist
        assert self.nlist is not None
        if x.shape[0] < self.nlist:
            raise InputError(
                f"MatmulIVFIndex: training needs at least nlist={self.nlist} vectors, got "
                f"{x.shape[0]}; train on more data, lower nlist, or use the 'exact' index"
            )
        sample = x if rows is None else x[rows]
        self._centroids = spherical_kmeans(sample, self.nlist, self.iterations, self.seed)

    def _add(self, x: torch.Tensor) -> None:
        if not self.is_trained:
            self._train(x)
        assert self._centroids is not None
        self._pending.append((x, nearest_centroid(x, self._centroids)))
        self._ntotal += x.shape[0]
        self._residuals = None

    def _sort_in(self) -> None:
        """Merge the keys added since the last search into the list-by-list storage."""
        if not self._pending:
            return
        assert self._centroids is not None
        new_keys = [keys for keys, _ in self._pending]
        dtype = torch.float16 if all(k.dtype == torch.float16 for k in new_keys) else torch.float32
        if self._keys.shape[0] and self._keys.dtype != dtype:
            dtype = torch.float32  # float16 and float32 keys mixed: keep both exact
        counts = torch.diff(self._offsets)
        old_lists = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
        start = self._ids.shape[0]
        lists = torch.cat([old_lists, *(lists for _, lists in self._pending)])
        ids = torch.cat([self._ids, torch.arange(start, self._ntotal)])
        keys = torch.cat([self._keys.to(dtype), *(k.to(dtype) for k in new_keys)])
        order = torch.argsort(lists, stable=True)  # list by list, insertion order within
        self._keys, self._ids = keys[order], ids[order]
        self._offsets = torch.zeros(self.nlist + 1, dtype=torch.int64)  # type: ignore[operator]
        self._offsets[1:] = torch.bincount(lists, minlength=self.nlist).cumsum(0)
        self._pending = []

    def _residual_rows(self) -> torch.Tensor:
        """``(N + pad, D)`` bf16 ``key - centroid`` list by list; ``pad`` zero rows let the
        last list be read at its padded size."""
        self._sort_in()
        if self._residuals is None:
            assert self._centroids is not None
            sizes = torch.diff(self._offsets)
            pad = padded_size(int(sizes.max())) if sizes.numel() else 0
            lists = torch.repeat_interleave(torch.arange(sizes.shape[0]), sizes)
            out = torch.zeros(self._keys.shape[0] + pad, self.dim, dtype=torch.bfloat16)
            for start in range(0, self._keys.shape[0], ASSIGN_ROWS):
                part = slice(start, min(start + ASSIGN_ROWS, self._keys.shape[0]))
                out[part] = self._keys[part].float() - self._centroids[lists[part]]
            self._residuals = out
        return self._residuals

    # --- searching -------------------------------------------------------------------

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        residuals = self._residual_rows()
        assert self._centroids is not None
        m, nprobe = q.shape[0], min(self.nprobe, self.nlist or 1)
        keep = min(k * self.k_factor, self._ntotal)
        q32 = q.float()
        coarse, probes = self._heap_top(q32 @ self._centroids.T, nprobe)  # (M, P) each
        pair_lists = probes.flatten()
        order = torch.argsort(pair_lists, stable=True)  # (query, list) pairs, list by list
        pair_query = (order // nprobe).numpy()  # int64, the heap subset of each list
        pair_coarse = coarse.flatten()[order]
        lists, counts = torch.unique_consecutive(pair_lists[order], return_counts=True)
        most = padded_size(int(counts.max()), 8)
        grouped = self._buffer("grouped", (m * nprobe + most) * self.dim, torch.bfloat16)
        grouped = grouped[: (m * nprobe + most) * self.dim].view(-1, self.dim)
        torch.index_select(q32.to(torch.bfloat16), 0, order // nprobe, out=grouped[: m * nprobe])
        grouped[m * nprobe :].zero_()  # the padding queries of the last list
        heaps = RowHeaps(m, keep)
        codes = self._position_codes()
        bounds = [0, *counts.cumsum(0).tolist()]
        offsets = self._offsets.tolist()
        sizes = [offsets[i + 1] - offsets[i] for i in lists.tolist()]
        widest = max(c * n for c, n in zip(counts.tolist(), sizes))
        scratch = self._buffer("first", widest, torch.float32)
        products = self._buffer(
            "scores", padded_size(max(sizes)) * padded_size(int(counts.max()), 8), torch.bfloat16
        )
        for j, list_id in enumerate(lists.tolist()):
            a, b = offsets[list_id], offsets[list_id + 1]
            if a == b:
                continue
            lo, hi = bounds[j], bounds[j + 1]
            # (n, c): the list's keys as the matmul's left operand, read in place; the
            # padded shapes reuse oneDNN kernels, and the padding rows are dropped
            n_pad, c_pad = padded_size(b - a), padded_size(hi - lo, 8)
            scores = products[: n_pad * c_pad].view(n_pad, c_pad)
            torch.mm(residuals[a : a + n_pad], grouped[lo : lo + c_pad].T, out=scores)
            first = scratch[: (hi - lo) * (b - a)].view(hi - lo, b - a)
            first.copy_(scores[: b - a, : hi - lo].T).add_(pair_coarse[lo:hi, None])
            heaps.add_to_rows(first, pair_query[lo:hi], codes[a:b])
        _, rows = heaps.result()  # (M, keep) storage rows, -1 where fewer were probed
        return self._rescore(q32, rows, k)

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat scratch tensor of at least ``numel`` elements, kept between searches
        (per thread): a fresh one per search costs its page faults (a 6 MB query block at
        D = 768: 2.4 against 1.0 ms to zero), and a gather into it 2.4 against 7.2 ms."""
        store = self.__dict__.setdefault("_scratch", threading.local()).__dict__
        held = store.get(name)
        if held is None or held.numel() < numel or held.dtype != dtype:
            held = store[name] = torch.empty(numel, dtype=dtype)
        return held

    def _position_codes(self) -> np.ndarray:
        """Heap codes of the storage rows ``0 … N-1`` (the ids the heaps collect), built once."""
        codes = getattr(self, "_codes", None)
        if codes is None or codes.shape[0] != self._keys.shape[0]:
            codes = self._codes = id_codes(0, self._keys.shape[0])
        return codes

    def _heap_top(self, scores: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Row-wise ``count`` largest of ``scores (M, n)`` float32, best first."""
        heaps = RowHeaps(scores.shape[0], count)
        heaps.add(scores)
        return heaps.result()

    def _rescore(
        self, q: torch.Tensor, rows: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact scores of the candidate storage ``rows (M, c)`` (``-1``: none); best ``k``.

        ``RESCORE_QUERIES`` queries at a time, so their gathered keys (converted to
        float32) stay in cache: 2.5x faster than one gather of all at 1024 × 30 × 384."""
        found = rows >= 0
        safe = rows.clamp(min=0)
        count = rows.shape[1]
        sims = torch.empty(rows.shape)
        block = torch.empty(RESCORE_QUERIES * count, self.dim)
        for start in range(0, rows.shape[0], RESCORE_QUERIES):
            part = safe[start : start + RESCORE_QUERIES]
            keys = block[: part.numel()].copy_(self._keys.index_select(0, part.flatten()))
            keys = keys.view(part.shape[0], count, self.dim).transpose(1, 2)  # (m, D, c)
            torch.bmm(
                q[start : start + part.shape[0]].unsqueeze(1),
                keys,
                out=sims[start : start + part.shape[0]].unsqueeze(1),
            )
        sims, pick = sims.masked_fill(~found, float("-inf")).topk(k, dim=1)
        ids = self._ids[safe.gather(1, pick)]
        return sims, ids.masked_fill(~found.gather(1, pick), -1)

    # --- persistence -----------------------------------------------------------------

    def _save_payload(self, folder: Path) -> None:
        if self._centroids is None:
            return  # saved before it was trained: nothing but parameters
        self._sort_in()
        tensors = {
            "centroids": self._centroids,
            "keys": self._keys,
            "ids": self._ids,
            "offsets": self._offsets,
        }
        save_tensors(folder / PAYLOAD_FILE, tensors)

    def _load_payload(self, folder: Path) -> None:
        path = folder / PAYLOAD_FILE
        if not path.is_file():
            return
        try:
            tensors = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types
            raise InputError(f"{path} is not a readable index payload ({exc}); rebuild it") from exc
        if tensors["keys"].shape[1:] != (self.dim,) or tensors["centroids"].shape[1:] != (
            self.dim,
        ):
            raise InputError(f"{path} holds vectors of another dimension than dim={self.dim}")
        self._centroids = tensors["centroids"]
        self._keys, self._ids, self._offsets = tensors["keys"], tensors["ids"], tensors["offsets"]
        self._ntotal = int(self._keys.shape[0])
