"""Exact search in torch: the oracle every approximate backend is tested against."""

from __future__ import annotations

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
    in float32. Peak extra memory is about ``query_chunk_size × chunk_size`` float32
    scores, whatever the number of queries ``M`` and keys ``N``.

    On CPU the matmul is the whole cost (it runs at the BLAS peak; the top-k merge is
    ~20%). ``device="cuda"`` keeps the keys on the GPU, where brute force over millions
    of keys takes milliseconds per query image; results still come back on the CPU.

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
        m_total = q.shape[0]
        sims = torch.empty(m_total, k, dtype=torch.float32)
        ids = torch.empty(m_total, k, dtype=torch.int64)
        for q_start in range(0, m_total, self.query_chunk_size):
            q_chunk = q[q_start : q_start + self.query_chunk_size]
            rows = slice(q_start, q_start + q_chunk.shape[0])
            chunk_sims, chunk_ids = self._search_chunk(q_chunk.to(self.device, torch.float32), k)
            sims[rows], ids[rows] = chunk_sims.cpu(), chunk_ids.cpu()
        return sims, ids

    def _search_chunk(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` over all keys for ``q (m, D)`` float32, merging chunk by chunk."""
        best_sims = torch.full((q.shape[0], k), float("-inf"), device=q.device)  # (m, k)
        best_ids = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=q.device)  # (m, k)
        for first_id, keys in self._key_chunks():
            scores = q @ keys.to(torch.float32).T  # (m, c)
            chunk_sims, chunk_ids = scores.topk(min(k, keys.shape[0]), dim=1)
            merged_sims = torch.cat([best_sims, chunk_sims], dim=1)
            merged_ids = torch.cat([best_ids, chunk_ids + first_id], dim=1)
            best_sims, order = merged_sims.topk(k, dim=1)
            best_ids = merged_ids.gather(1, order)
        return best_sims, best_ids

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
