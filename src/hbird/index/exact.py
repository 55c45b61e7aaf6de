"""Exact search in torch: the oracle every approximate backend is tested against."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from hbird.errors import InputError
from hbird.index.base import VectorIndex
from hbird.io.files import save_tensors

KEYS_FILE = "keys.safetensors"


class ExactIndex(VectorIndex):
    """Brute-force inner-product search by chunked matmul with a running top-k merge.

    Keys are stored as added (float16 stays float16, halving memory); scores are computed
    in float32. Peak extra memory is one ``query_chunk_size × chunk_size`` float32 score
    buffer and one ``chunk_size × D`` float32 key buffer, reused for the whole search,
    whatever the number of queries ``M`` and keys ``N``. Search many queries at once
    (the predictor searches a batch of images in one call): each key chunk is then
    converted once for all of them.

    On CPU the matmul is most of the cost; the per-chunk top-k takes about a third of the
    time (784 queries × 16,384 keys a chunk, one thread). ``device="cuda"`` keeps the
    keys on the GPU, where brute force over millions of keys takes milliseconds per query
    image; results still come back on the CPU.

    Args:
        dim: key dimension ``D``.
        chunk_size: keys scored per matmul.
        query_chunk_size: queries scored per matmul.
        device: where keys are stored and scored. A placement, not part of the saved
            index: ``load`` puts keys on the CPU unless told otherwise.
    """

    kind = "exact"
    exact_scores = True

    def __init__(
        self,
        dim: int,
        chunk_size: int = 16384,
        query_chunk_size: int = 1024,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(dim)
        for name, value in (("chunk_size", chunk_size), ("query_chunk_size", query_chunk_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"ExactIndex: {name} must be an int >= 1, got {value!r}")
        self.chunk_size = chunk_size
        self.query_chunk_size = query_chunk_size
        self.device = torch.device(device)
        self._blocks: list[torch.Tensor] = []  # each (N_i, D), float16 or float32, on device
        self._ntotal = 0

    @property
    def ntotal(self) -> int:
        return self._ntotal

    def params(self) -> dict[str, Any]:
        return {"chunk_size": self.chunk_size, "query_chunk_size": self.query_chunk_size}

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

    def _add(self, x: torch.Tensor) -> None:
        self._blocks.append(x.to(self.device, copy=True))
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
        m_total, device = q.shape[0], self.device
        q = q.to(device, torch.float32)
        best_sims = torch.full((m_total, k), float("-inf"), device=device)  # (M, k)
        best_ids = torch.full((m_total, k), -1, dtype=torch.int64, device=device)  # (M, k)
        # balanced query chunks: none is much smaller than the others (BLAS may round a
        # tiny chunk's dot products differently), so batching queries changes no score
        rows = math.ceil(m_total / math.ceil(m_total / self.query_chunk_size))
        cols = min(self.chunk_size, max(b.shape[0] for b in self._blocks))
        scores_buffer = torch.empty(rows * cols, device=device)
        keys_buffer = None
        for first_id, keys in self._key_chunks():
            c = keys.shape[0]
            if keys.dtype != torch.float32:
                if keys_buffer is None:
                    keys_buffer = torch.empty(cols, self.dim, device=device)
                keys = keys_buffer[:c].copy_(keys)
            for start in range(0, m_total, rows):
                q_chunk = q[start : start + rows]
                scores = scores_buffer[: q_chunk.shape[0] * c].view(q_chunk.shape[0], c)
                torch.mm(q_chunk, keys.T, out=scores)  # (m, c)
                chunk_sims, chunk_ids = scores.topk(min(k, c), dim=1)
                block = slice(start, start + q_chunk.shape[0])
                merged_sims = torch.cat([best_sims[block], chunk_sims], dim=1)
                merged_ids = torch.cat([best_ids[block], chunk_ids + first_id], dim=1)
                best_sims[block], order = merged_sims.topk(k, dim=1)
                best_ids[block] = merged_ids.gather(1, order)
        return best_sims.cpu(), best_ids.cpu()

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
