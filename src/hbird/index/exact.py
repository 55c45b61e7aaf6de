"""Exact search in torch: the oracle every approximate backend is tested against."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from hbird._optional import require
from hbird.errors import InputError
from hbird.index.base import ArrayLike, VectorIndex
from hbird.index.certified import (
    BoundTables,
    band_bounds,
    bf16_matmul,
    bound_tables,
    certified,
    extended_keys,
    extended_queries,
    oracle_error,
    padded_width,
)
from hbird.index.heaps import RowHeaps, heaps_available
from hbird.io.files import save_tensors

KEYS_FILE = "keys.safetensors"
BACKENDS = ("torch", "faiss")
"""How ``ExactIndex`` scores a key chunk: torch matmul + topk, or ``faiss.knn``."""
FALLBACK_ROWS = 32
"""Fewest query rows the bf16 path's float32 fallback searches (padded with zeros): MKL
rounds a matmul of fewer than 16 rows differently from a larger one (measured here),
and the fallback's scores are to equal those of the float32 search of the whole batch."""
RESCORE_QUERIES = 16
"""Queries whose candidates the bf16 path gathers and re-scores together (their keys in
float32 stay in cache, as in ``ivf_matmul``)."""
SELECTIONS = ("auto", "heap", "topk")
"""How the torch backend keeps each query's best scores: faiss's C++ heaps over a reused
score buffer (``heap``, CPU), ``torch.topk`` + merge per chunk (``topk``: the oracle and
the GPU path), or ``auto``: ``heap`` on the CPU when faiss is installed, else ``topk``."""
SCORINGS = ("float32", "bf16")
"""``ExactIndex``'s scores: float32, or a certified bf16 first pass re-scored in float32."""


def merge_top_k(
    sims: torch.Tensor, ids: torch.Tensor, new_sims: torch.Tensor, new_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The best ``k = sims.shape[1]`` of ``(m, k)`` results and ``(m, c)`` new ones, per row
    (one cat + topk: the merge the search has always done, so tie order is unchanged)."""
    merged_sims = torch.cat([sims, new_sims], dim=1)
    merged_ids = torch.cat([ids, new_ids], dim=1)
    best_sims, order = merged_sims.topk(sims.shape[1], dim=1)
    return best_sims, merged_ids.gather(1, order)


class ExactIndex(VectorIndex):
    """Brute-force inner-product search by chunked matmul with a running top-k merge.

    Keys are stored as added (float16 stays float16, halving memory); scores are computed
    in float32. Peak extra memory is one ``query_chunk_size × chunk_size`` float32 score
    buffer and one ``chunk_size × D`` float32 key buffer, reused for the whole search,
    whatever the number of queries ``M`` and keys ``N``. Search many queries at once
    (the predictor searches a batch of images in one call): each key chunk is then
    converted once for all of them.

    Selection (``selection``): on the CPU with faiss installed (``auto``, or ``heap``),
    each chunk's scores go to faiss's C++ heaps (``index.heaps.RowHeaps``: one pass over
    the reused score buffer, no per-chunk ``topk`` and no merge). The scores are the
    same matmul outputs, so bit-identical to ``selection="topk"`` (``torch.topk`` per
    chunk + merge: the oracle, and the path on a GPU or without faiss); only the order of
    exactly tied keys may differ. Heap ties are canonical: the ``k`` best by (score
    descending, id ascending), in that order, whatever the chunk sizes (``topk``'s tie
    order is torch's).

    ``device="cuda"`` keeps the keys on the GPU, where brute force over millions of keys
    takes milliseconds per query image; results still come back on the CPU.

    ``backend="faiss"`` scores each converted key chunk with faiss's brute-force kNN
    (``faiss.knn``: BLAS sgemm in blocks with a fused heap top-k) instead of torch's
    matmul + topk; keys stay stored once, as added. Scores agree with the torch path to
    float32 rounding, and tied keys may come in another order. The torch path is the
    oracle, the GPU path and the default; on this project's CPU, with faiss's OpenBLAS
    told its core type (``hbird._openblas``), the faiss backend takes 0.94x its time
    (docs/performance.md, "Search").

    ``scoring="bf16"`` (``--index-param scoring=bf16``, CPU, needs faiss) is exact too,
    by another route (``index.certified``, where the bound is derived): one pass of
    float32 matmuls in oneDNN's bf16 mode (AMX here) over bf16-rounded queries and
    centred keys keeps ``k * shortlist`` candidates per query; a per-query certificate
    built on a rigorous bound of the first pass's error proves that the float32 top
    ``k`` is among them; they are re-scored in float32, and queries that fail the
    certificate are searched again in float32. The results equal the float32 search's
    (tests compare them bit for bit); what it saves depends on how many queries pass
    (``last_search``; measured in docs/performance.md, "Exact search").

    Args:
        dim: key dimension ``D``.
        chunk_size: keys scored per matmul.
        query_chunk_size: queries scored per matmul.
        device: where keys are stored and scored. A placement, not part of the saved
            index: ``load`` puts keys on the CPU unless told otherwise.
        backend: ``"torch"`` or ``"faiss"`` (CPU only, needs ``pip install "hbird[faiss]"``).
        scoring: ``"float32"`` (the default) or ``"bf16"`` (certified first pass).
        shortlist: with ``scoring="bf16"``, candidates kept per neighbour (``>= 1``;
            4 certifies 85% of queries on random-ViT patch features, 8 97%).
        selection: ``"auto"`` (default), ``"heap"`` (CPU, needs faiss) or ``"topk"``.
    """

    kind = "exact"
    exact_scores = True

    def __init__(
        self,
        dim: int,
        chunk_size: int = 16384,
        query_chunk_size: int = 1024,
        device: str | torch.device = "cpu",
        backend: str = "torch",
        scoring: str = "float32",
        shortlist: int = 4,
        selection: str = "auto",
    ) -> None:
        super().__init__(dim)
        sizes = (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size))
        for name, value in (*sizes, ("shortlist", shortlist)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ExactIndex: {name} must be an int >= 1, got {value!r}")
        if backend not in BACKENDS:
            raise InputError(f"ExactIndex: backend must be 'torch' or 'faiss', got {backend!r}")
        if selection not in SELECTIONS:
            raise InputError(
                f"ExactIndex: selection must be 'auto', 'heap' or 'topk', got {selection!r}"
            )
        if selection == "heap" and (backend != "torch" or torch.device(device).type != "cpu"):
            raise InputError("ExactIndex: selection='heap' needs backend='torch' on the CPU")
        if scoring not in SCORINGS:
            raise InputError(f"ExactIndex: scoring must be 'float32' or 'bf16', got {scoring!r}")
        if scoring == "bf16" and backend != "torch":
            raise InputError("ExactIndex: scoring='bf16' needs backend='torch'")
        if scoring == "bf16" and torch.device(device).type != "cpu":
            raise InputError(
                f"ExactIndex: scoring='bf16' runs on the CPU (oneDNN), not {device}; "
                "use scoring='float32' on a GPU"
            )
        if scoring == "bf16" and selection == "topk":
            raise InputError("ExactIndex: scoring='bf16' selects by heaps, not selection='topk'")
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size
        self.device = torch.device(device)
        self.backend = backend
        self.scoring = scoring
        self.shortlist = shortlist
        self.selection = selection
        if selection == "heap" or scoring == "bf16":
            require("faiss", f"ExactIndex(selection={selection!r}, scoring={scoring!r})")
        if backend == "faiss":
            if self.device.type != "cpu":
                raise InputError(
                    f"ExactIndex: backend='faiss' searches on the CPU, not {self.device}; "
                    "use backend='torch' on a GPU"
                )
            self._faiss = require("faiss", "ExactIndex(backend='faiss')")
        self._blocks: list[torch.Tensor] = []  # each (N_i, D), float16 or float32, on device
        self._ntotal = 0
        self._tables: BoundTables | None = None  # scoring="bf16": the keys' side of its bound
        self.last_search: dict[str, int] = {}  # scoring="bf16": queries, certified, candidates

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def params(self) -> dict[str, Any]:
        return {
            "chunk_size": self.chunk_size,
            "query_chunk_size": self.query_chunk_size,
            "backend": self.backend,
            **({"selection": self.selection} if self.selection != "auto" else {}),
            **({"scoring": "bf16", "shortlist": self.shortlist} if self.scoring == "bf16" else {}),
        }

    @property
    def keys(self) -> torch.Tensor:
        """All keys ``(N, D)`` in id order (a copy if added in several calls)."""
        if not self._blocks:
            return torch.empty(0, self.dim)
        if len(self._blocks) == 1:
            return self._blocks[0].cpu()
        dtype = self._blocks[0].dtype
        for block in self._blocks[1:]:
            dtype = torch.promote_types(dtype, block.dtype)
        return torch.cat([b.to(dtype) for b in self._blocks]).cpu()

    def add(self, x: ArrayLike) -> None:
        """Append keys ``x (N, D)``; they are copied, so changing ``x`` later does not change
        the index. ``fill`` keeps its input as it is instead (on the CPU, float16 or float32):
        a bank's keys and its exact index are then one copy, not two."""
        if isinstance(x, torch.Tensor):
            x = x.clone()
        elif isinstance(x, np.ndarray):
            x = x.copy()
        super().add(x)

    def _add(self, x: torch.Tensor) -> None:
        self._tables = None
        self._blocks.append(x.to(self.device))
        self._ntotal += x.shape[0]

    def _key_chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first id, keys (c, D))`` pairs covering all keys, ``c <= chunk_size``."""
        offset = 0
        for block in self._blocks:
            for start in range(0, block.shape[0], self.chunk_size):
                yield offset + start, block[start : start + self.chunk_size]
            offset += block.shape[0]

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` over all keys for ``q (M, D)``, merging key chunk by key chunk.

        Key chunks are the outer loop, so each is converted to float32 once per call (into
        one reused ``(chunk_size, D)`` buffer) however many query chunks there are; the
        scores of a (query chunk, key chunk) pair go to one reused buffer. Per query, the
        same scores and the same sequence of merges as chunk-by-chunk search give the same
        neighbours, so batching queries changes no result (as long as no query chunk is
        tiny: query chunks are balanced).
        """
        if self.scoring == "bf16":
            return self._search_bf16(q, k)
        return self._search_float32(q, k)

    def _search_float32(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``_search`` with float32 scores (the ``scoring="float32"`` path)."""
        m_total, device = q.shape[0], self.device
        q = q.to(device, torch.float32)
        heaps = RowHeaps(m_total, k) if self._uses_heaps() else None
        best_sims = torch.full((m_total, k), float("-inf"), device=device)  # (M, k)
        best_ids = torch.full((m_total, k), -1, dtype=torch.int64, device=device)  # (M, k)
        # balanced query chunks: none is much smaller than the others (BLAS may round a
        # tiny chunk's dot products differently), so batching queries changes no score
        rows = math.ceil(m_total / math.ceil(m_total / self.query_chunk_size))
        cols = min(self.chunk_size, max(b.shape[0] for b in self._blocks))
        scores_buffer = torch.empty(rows * cols if self.backend == "torch" else 0, device=device)
        keys_buffer = None
        for first_id, keys in self._key_chunks():
            c = keys.shape[0]
            if keys.dtype != torch.float32:
                if keys_buffer is None:
                    keys_buffer = torch.empty(cols, self.dim, device=device)
                keys = keys_buffer[:c].copy_(keys)
            for start in range(0, m_total, rows):
                q_chunk = q[start : start + rows]
                if self.backend == "faiss":
                    chunk_sims, chunk_ids = self._faiss_knn(q_chunk, keys, min(k, c))
                else:
                    scores = scores_buffer[: q_chunk.shape[0] * c].view(q_chunk.shape[0], c)
                    torch.mm(q_chunk, keys.T, out=scores)  # (m, c)
                    if heaps is not None:
                        heaps.add(scores, first_id, start)
                        continue
                    chunk_sims, chunk_ids = scores.topk(min(k, c), dim=1)
                block = slice(start, start + q_chunk.shape[0])
                best_sims[block], best_ids[block] = merge_top_k(
                    best_sims[block], best_ids[block], chunk_sims, chunk_ids + first_id
                )
        if heaps is not None:
            return heaps.result()
        return best_sims.cpu(), best_ids.cpu()

    def _uses_heaps(self) -> bool:
        """Whether the torch backend selects by faiss's heaps (``selection``, module doc)."""
        if self.backend != "torch" or self.device.type != "cpu" or self.selection == "topk":
            return False
        return self.selection == "heap" or heaps_available()

    def _search_bf16(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-``k`` for ``q (M, D)`` from a certified bf16 first pass
        (``index.certified``: the bound, the certificate and why the result is exact).

        One pass over the keys, band by band, scores upper bounds ``u`` by float32
        matmuls in oneDNN's bf16 mode into a reused buffer, and faiss heaps keep the
        ``kc = k · shortlist`` best per query. Certified queries have their candidates
        re-scored in float32; the others are searched again by the float32 path.
        ``last_search`` records how many passed.
        """
        m_total = q.shape[0]
        q = q.to(self.device, torch.float32)
        width = min(k * self.shortlist, self.ntotal)
        tables = self._bound_tables()
        upper, candidates, beta = self._bf16_first_pass(q, width)  # (M, width), best first
        if width == self.ntotal:
            ok = torch.ones(m_total, dtype=torch.bool)  # every key is a candidate
        else:
            ok = certified(upper, candidates, beta, oracle_error(q, tables), tables, k)
        self.last_search = {"queries": m_total, "certified": int(ok.sum()), "candidates": width}
        sims = torch.full((m_total, k), float("-inf"))
        ids = torch.full((m_total, k), -1, dtype=torch.int64)
        if bool(ok.any()):
            sims[ok], ids[ok] = self._rerank(q[ok], candidates[ok], k)
        if not bool(ok.all()):
            failed = q[~ok]
            padded = torch.zeros(max(failed.shape[0], FALLBACK_ROWS), self.dim)
            padded[: failed.shape[0]] = failed
            fallback_sims, fallback_ids = self._search_float32(padded, k)
            sims[~ok], ids[~ok] = fallback_sims[: failed.shape[0]], fallback_ids[: failed.shape[0]]
        return sims, ids

    def _bf16_first_pass(
        self, q: torch.Tensor, width: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The ``width`` best keys for ``q (M, D)`` float32 by the upper bound ``u`` of
        ``index.certified``: ``(M, width)`` bounds and ids, best first, and the bands'
        ``β (M, bands)``."""
        m_total = q.shape[0]
        tables = self._bound_tables()
        _, beta = band_bounds(q, tables)
        rows = math.ceil(m_total / math.ceil(m_total / self.query_chunk_size))
        cols = min(self.chunk_size, self.ntotal)
        scores_buffer = torch.empty(rows * cols)
        keys_buffer = torch.empty(cols, padded_width(self.dim))
        queries = extended_queries(q, tables)  # (M, n)
        heaps = RowHeaps(m_total, width)
        with bf16_matmul():
            for band in range(len(tables.starts) - 1):
                queries[:, self.dim + 3] = beta[:, band]
                for start in range(tables.starts[band], tables.starts[band + 1], cols):
                    ids = tables.order[start : min(start + cols, tables.starts[band + 1])]
                    keys = extended_keys(self._rows(ids), tables.mass[ids], tables, keys_buffer)
                    for first in range(0, m_total, rows):
                        q_chunk = queries[first : first + rows]
                        scores = scores_buffer[: q_chunk.shape[0] * ids.shape[0]]
                        scores = scores.view(q_chunk.shape[0], ids.shape[0])
                        torch.mm(q_chunk, keys.T, out=scores)  # (m, c)
                        heaps.add(scores, first_row=first, ids=ids)
        upper, candidates = heaps.result()
        return upper, candidates, beta

    def _bound_tables(self) -> BoundTables:
        """The keys' side of the bf16 first pass, computed once per set of keys."""
        if self._tables is None:
            self._tables = bound_tables([keys for _, keys in self._key_chunks()], self.dim)
        return self._tables

    def _rerank(
        self, q: torch.Tensor, ids: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` of the candidates ``ids (M, c)`` (``c >= 1`` distinct ids) by
        float32 inner product with ``q (M, D)``: ``(M, k)`` scores and ids, ties lower id
        first (as heap selection), padded with ``-inf`` / ``-1`` when ``c < k``."""
        ids = ids.sort(dim=1).values  # id order, so the stable sort below breaks ties by id
        m, c = ids.shape
        sims = torch.empty(m, c)
        block = torch.empty(RESCORE_QUERIES * c, self.dim)  # gathered keys stay in cache
        for start in range(0, m, RESCORE_QUERIES):
            part = ids[start : start + RESCORE_QUERIES]
            keys = block[: part.numel()].copy_(self._rows(part.flatten()))
            torch.bmm(
                keys.view(part.shape[0], c, self.dim),
                q[start : start + part.shape[0], :, None],
                out=sims[start : start + part.shape[0], :, None],
            )
        order = torch.sort(sims, dim=1, descending=True, stable=True).indices[:, :k]
        best, best_ids = sims.gather(1, order), ids.gather(1, order)
        if best.shape[1] < k:
            pad = k - best.shape[1]
            best = torch.cat([best, best.new_full((best.shape[0], pad), float("-inf"))], 1)
            best_ids = torch.cat([best_ids, best_ids.new_full((best.shape[0], pad), -1)], 1)
        return best.cpu(), best_ids.cpu()

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Stored keys by id: ``ids (...)`` → ``(..., D)`` in the storage dtype."""
        if len(self._blocks) == 1:
            return self._blocks[0][ids]
        dtype = self._blocks[0].dtype
        for block in self._blocks[1:]:
            dtype = torch.promote_types(dtype, block.dtype)
        out = torch.empty(*ids.shape, self.dim, dtype=dtype, device=ids.device)
        offset = 0
        for block in self._blocks:
            inside = (ids >= offset) & (ids < offset + block.shape[0])
            out[inside] = block[ids[inside] - offset].to(out.dtype)
            offset += block.shape[0]
        return out

    def _faiss_knn(
        self, q: torch.Tensor, keys: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` of float32 ``keys (c, D)`` for ``q (m, D)`` by ``faiss.knn``: ``(m, k)`` pairs.

        faiss scores fewer than ``distance_compute_blas_threshold`` queries (128,000 in
        faiss 1.15) without BLAS, several times slower than sgemm here, so the threshold
        is lowered for the call (to faiss's historical 20).
        """
        faiss = self._faiss
        threshold = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = min(threshold, 20)
        try:
            sims, ids = faiss.knn(q.numpy(), keys.numpy(), k, faiss.METRIC_INNER_PRODUCT)
        finally:
            faiss.cvar.distance_compute_blas_threshold = threshold
        return torch.from_numpy(sims), torch.from_numpy(ids)

    def _save_payload(self, folder: Path) -> None:
        save_tensors(folder / KEYS_FILE, {"keys": self.keys})

    def _load_payload(self, folder: Path) -> None:
        path = folder / KEYS_FILE
        if not path.is_file():
            raise InputError(f"{folder} lacks {KEYS_FILE}; the index folder is incomplete")
        keys = load_file(str(path))["keys"]
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise InputError(
                f"{path}: keys have shape {tuple(keys.shape)}, expected (N, {self.dim})"
            )
        self._blocks = [keys.to(self.device)] if keys.shape[0] else []
        self._tables = None
        self._ntotal = keys.shape[0]
