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
from hbird.index.heaps import RowHeaps, heaps_available
from hbird.io.files import save_tensors

KEYS_FILE = "keys.safetensors"
BACKENDS = ("torch", "faiss")
"""How ``ExactIndex`` scores a key chunk: torch matmul + topk, or ``faiss.knn``."""
SELECTIONS = ("auto", "heap", "topk")
"""How the torch backend keeps each query's best scores: faiss's C++ heaps over a reused
score buffer (``heap``, CPU), ``torch.topk`` + merge per chunk (``topk``: the oracle and
the GPU path), or ``auto``: ``heap`` on the CPU when faiss is installed, else ``topk``."""
SCORINGS = ("float32", "bf16")
"""``ExactIndex``'s first pass: exact float32 scores, or a bf16 shortlist re-ranked in float32."""


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
    order is torch's). ``device="cuda"`` keeps the
    keys on the GPU, where brute force over millions of keys takes milliseconds per query
    image; results still come back on the CPU.

    ``backend="faiss"`` scores each converted key chunk with faiss's brute-force kNN
    (``faiss.knn``: BLAS sgemm in blocks with a fused heap top-k) instead of torch's
    matmul + topk; keys stay stored once, as added. Scores agree with the torch path to
    float32 rounding, and tied keys may come in another order. The torch path is the
    oracle, the GPU path and the default; on this project's CPU, with faiss's OpenBLAS
    told its core type (``hbird._openblas``), the faiss backend takes 0.94x its time
    (docs/performance.md, "Search").

    ``scoring="bf16"`` (``--index-param scoring=bf16``) is a cheaper, approximate option
    (see :meth:`_search_bf16`): key chunks after the first are scored by a bf16 matmul
    (2-4x float32's rate on CPUs with AMX or AVX512-BF16, and on GPUs), which keeps a
    shortlist of ``k * shortlist`` candidates per query; the shortlist is then re-scored
    exactly in float32. Returned scores are exact inner products; a true neighbour can
    be missed where bf16 rounding pushes it out of the shortlist (measured recall in
    docs/performance.md, "Exact search"). The whole search gains less than the matmul
    (0.90x the float32 time on this CPU): the per-chunk top-k stays as it was.

    Args:
        dim: key dimension ``D``.
        chunk_size: keys scored per matmul.
        query_chunk_size: queries scored per matmul.
        device: where keys are stored and scored. A placement, not part of the saved
            index: ``load`` puts keys on the CPU unless told otherwise.
        backend: ``"torch"`` or ``"faiss"`` (CPU only, needs ``pip install "hbird[faiss]"``).
        scoring: ``"float32"`` (exact, the default) or ``"bf16"`` (shortlist + re-rank).
        shortlist: with ``scoring="bf16"``, candidates kept per neighbour (``>= 1``).
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
        shortlist: int = 2,
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
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size
        self.device = torch.device(device)
        self.backend = backend
        self.scoring = scoring
        self.shortlist = shortlist
        self.selection = selection
        if selection == "heap":
            require("faiss", "ExactIndex(selection='heap')")
        if backend == "faiss":
            if self.device.type != "cpu":
                raise InputError(
                    f"ExactIndex: backend='faiss' searches on the CPU, not {self.device}; "
                    "use backend='torch' on a GPU"
                )
            self._faiss = require("faiss", "ExactIndex(backend='faiss')")
        self._blocks: list[torch.Tensor] = []  # each (N_i, D), float16 or float32, on device
        self._ntotal = 0

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
        """Top-``k`` for ``q (M, D)`` from a bf16 shortlist re-scored in float32.

        The first key chunk is scored exactly (float32), which gives each query a
        threshold ``t``: its ``k``-th best score so far. Every later chunk is scored in
        bf16 as ``q·x - t`` (extra key columns of ones against query columns holding
        ``-t``), so the matmul's float32 accumulator subtracts ``t`` before its output is
        rounded to bf16: near the threshold, where the shortlist is decided, the rounding
        error is relative to ``|q·x - t|``, not to ``|q·x|`` (without the shift, bf16's
        8-bit mantissa cannot order scores 1e-3 apart). What is left is the rounding of
        the inputs to bf16. The best ``k * shortlist`` candidates by these scores, kept
        chunk by chunk with ``t`` rising, are re-scored in float32 at the end. ``t`` takes
        two bf16 columns (its rounding and the rest), so it is subtracted to about 2^-16.
        """
        m_total, device, d = q.shape[0], self.device, self.dim
        width = min(k * self.shortlist, self.ntotal)
        q = q.to(device, torch.float32)
        rows = math.ceil(m_total / math.ceil(m_total / self.query_chunk_size))
        cols = min(self.chunk_size, max(b.shape[0] for b in self._blocks))
        keys_bf16 = torch.ones(cols, d + 2, dtype=torch.bfloat16, device=device)  # [x, 1, 1]
        queries_bf16 = torch.empty(rows, d + 2, dtype=torch.bfloat16, device=device)  # [q, -t]
        scores_bf16 = torch.empty(rows * cols, dtype=torch.bfloat16, device=device)
        chunks = self._key_chunks()
        _, keys = next(chunks)  # scored exactly: the first shortlist and thresholds
        c = keys.shape[0]
        keys = keys.to(torch.float32)
        scores_float = torch.empty(rows * c, device=device)
        short_sims = torch.empty(m_total, min(width, c), device=device)  # (M, <= width)
        short_ids = torch.empty(m_total, min(width, c), dtype=torch.int64, device=device)
        for start in range(0, m_total, rows):
            block = slice(start, start + rows)
            scores = scores_float[: q[block].shape[0] * c].view(-1, c)
            torch.mm(q[block], keys.T, out=scores)  # (m, c)
            short_sims[block], short_ids[block] = scores.topk(short_sims.shape[1], dim=1)
        del scores_float, scores
        for first_id, keys in chunks:  # approximate scores from here on
            c = keys.shape[0]
            keys_bf16[:c, :d].copy_(keys)
            new_width = min(width, short_sims.shape[1] + c)  # widens until it holds `width`
            new_sims = torch.empty(m_total, new_width, device=device)
            new_ids = torch.empty(m_total, new_width, dtype=torch.int64, device=device)
            for start in range(0, m_total, rows):
                block = slice(start, start + rows)
                m = q[block].shape[0]
                threshold = short_sims[block, min(k, short_sims.shape[1]) - 1]  # (m,)
                queries_bf16[:m, :d].copy_(q[block])
                high = queries_bf16[:m, d].copy_(-threshold)  # t in two bf16 parts
                queries_bf16[:m, d + 1].copy_(-threshold - high.to(torch.float32))
                subtracted = -queries_bf16[:m, d:].to(torch.float32).sum(dim=1)  # (m,) ≈ t
                shifted = scores_bf16[: m * c].view(m, c)
                torch.mm(queries_bf16[:m], keys_bf16[:c].T, out=shifted)  # (m, c): q·x - t
                chunk_sims, chunk_ids = shifted.topk(min(width, c), dim=1, sorted=False)
                chunk_sims = chunk_sims.to(torch.float32) + subtracted[:, None]
                merged_sims = torch.cat([short_sims[block], chunk_sims], dim=1)
                merged_ids = torch.cat([short_ids[block], chunk_ids + first_id], dim=1)
                best, order = merged_sims.topk(new_width, dim=1)
                new_sims[block], new_ids[block] = best, merged_ids.gather(1, order)
            short_sims, short_ids = new_sims, new_ids
        return self._rerank(q, short_ids, k)

    def _rerank(
        self, q: torch.Tensor, ids: torch.Tensor, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` of the candidates ``ids (M, c)`` by exact float32 inner product
        with ``q (M, D)``: ``(M, k)`` scores and ids."""
        sims = torch.empty(ids.shape, device=q.device)
        rows = max(1, (8 << 20) // (ids.shape[1] * self.dim))  # (rows, c, D) floats: 32 MB
        for start in range(0, q.shape[0], rows):
            block = slice(start, start + rows)
            candidates = self._rows(ids[block]).to(torch.float32)  # (m, c, D)
            sims[block] = torch.bmm(candidates, q[block, :, None])[..., 0]
        best, order = sims.topk(k, dim=1)
        return best.cpu(), ids.gather(1, order).cpu()

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
        self._ntotal = keys.shape[0]
