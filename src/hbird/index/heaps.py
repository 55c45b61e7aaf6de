"""Per-row top-``k`` selection by faiss's C++ heaps, with a canonical tie rule.

``torch.topk`` over a ``(m, c)`` score matrix costs about as much as the matmul that
made it (784 × 16,384 float32 scores here); faiss's heaps (``float_minheap_array_t``)
read each score once and touch a heap only for the few that beat a row's running
``k``-th best. ``RowHeaps`` keeps one heap of ``width`` entries per query row across
any number of ``add`` calls (key chunks).

Ties: with keys offered in increasing id order (as ``ExactIndex`` does, whatever its
chunk sizes), the kept entries are the ``width`` best by (score descending, id
ascending), and ``result`` returns them in that order: a stable sort's result. faiss's
min-heap evicts the smallest (score, id) pair first and lets a new score in only when it
is strictly larger than the heap's worst, so ids are stored as ``-2 - id``: the largest
id is then evicted first among equal scores, and a later (higher id), equal score never
displaces a kept one. (``-1`` is faiss's empty slot, so ids map to ``<= -2``.) Offered
out of id order, a tie at the cut keeps the id seen first.
"""

from __future__ import annotations

import numpy as np
import torch

from hbird._optional import is_available, require


def id_codes(first_id: int, count: int) -> np.ndarray:
    """``(count,)`` int64 heap codes ``-2 - id`` of ids ``first_id … first_id + count - 1``."""
    return np.arange(-2 - first_id, -2 - first_id - count, -1, dtype=np.int64)


class RowHeaps:
    """``rows`` heaps of the ``width`` largest float32 scores and their int64 ids.

    Args:
        rows: number of query rows ``M``.
        width: entries kept per row (``k``; may exceed the number of keys: the rest is
            padding, ``-inf`` / ``-1``).
    """

    def __init__(self, rows: int, width: int) -> None:
        self._faiss = require("faiss", "heap selection (faiss's C++ heaps)")
        self.values = np.full((rows, width), -np.inf, dtype=np.float32)  # (M, width)
        self.codes = np.full((rows, width), -1, dtype=np.int64)  # (M, width), -1 empty
        heaps = self._faiss.float_minheap_array_t()
        heaps.nh, heaps.k = rows, width
        heaps.val = self._faiss.swig_ptr(self.values)
        heaps.ids = self._faiss.swig_ptr(self.codes)
        heaps.heapify()
        self._heaps = heaps

    def add(
        self,
        scores: torch.Tensor,
        first_id: int = 0,
        first_row: int = 0,
        ids: torch.Tensor | None = None,
    ) -> None:
        """Offer ``scores (m, c)`` (float32, CPU) of keys ``first_id …`` (or of the keys
        ``ids (c,)`` int64, any order) to rows ``first_row … first_row + m - 1``."""
        m, c = scores.shape
        scores = scores.contiguous()
        codes = id_codes(first_id, c) if ids is None else -2 - ids.numpy().astype(np.int64)
        self._heaps.addn_with_ids(
            c,
            self._faiss.swig_ptr(scores.numpy()),
            self._faiss.swig_ptr(codes),
            0,  # the same ids for every row
            first_row,
            m,
        )

    def add_to_rows(self, scores: torch.Tensor, rows: np.ndarray, codes: np.ndarray) -> None:
        """Offer ``scores (m, c)`` (float32, CPU) to the heaps of ``rows (m,)`` int64 (any
        rows, any order), for keys whose heap codes are ``codes (c,)`` (:func:`id_codes`;
        a precomputed slice saves building them per call)."""
        self._heaps.addn_query_subset_with_ids(
            scores.shape[0],
            self._faiss.swig_ptr(rows),
            scores.shape[1],
            self._faiss.swig_ptr(scores.contiguous().numpy()),
            self._faiss.swig_ptr(codes),
            0,  # the same ids for every row
        )

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, width)`` scores and ids, best first (ties: lower id first), ``-inf`` / ``-1``
        where a row holds fewer entries. Call once: it sorts the heaps in place."""
        self._heaps.reorder()
        ids = -2 - self.codes
        empty = self.codes == -1
        ids[empty] = -1
        values = self.values
        values[empty] = -np.inf  # faiss pads with the lowest float, not -inf
        return torch.from_numpy(values), torch.from_numpy(ids)


def heaps_available() -> bool:
    """Whether faiss (and so ``RowHeaps``) can be imported."""
    return is_available("faiss")
