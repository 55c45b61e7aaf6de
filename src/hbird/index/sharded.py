"""Search a bank split over the ranks of a process group: faiss's ``IndexShards``, across processes.

Each rank holds one contiguous slice of the global ids, ``[offset, offset + n)``, in any
local :class:`~hbird.index.base.VectorIndex` (exact, faiss, ScaNN, on GPU or CPU). A
search is collective; every rank calls it, with its own queries (possibly none):

1. the queries of all ranks are gathered (``Q = Σ_r Q_r`` rows on every rank);
2. each rank searches its slice: ``(Q, k)`` local top-k, ids shifted to global ids;
3. each query's candidates go back to the query's own rank (``W`` lists of ``k``);
4. there they are merged into the global top-k: by score, ties by the smaller global id,
   so the result depends on nothing but the keys (not on timing or rank order).

With an exact local index the result equals one-process exact search over all keys.
Decoding then needs the neighbours' values, which live on their owners' ranks:
:meth:`ShardedIndex.fetch` asks each owner for exactly the rows its neighbours name.
Network per query row: ``D`` floats out and ``W·k`` (score, id) pairs back, then ``k``
rows of the fetched table (``docs/scale.md``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from hbird import distributed
from hbird.errors import InputError
from hbird.index.base import VectorIndex, _finish_results, as_key_matrix


def slice_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of ``n`` that rank ``rank`` of ``world`` holds (sizes differ by ≤ 1)."""
    return n * rank // world, n * (rank + 1) // world


def merge_top_k(sims: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, M)`` candidates → ``(Q, k)``: the largest scores, ties by the smaller id, empty
    slots (id ``-1``) last."""
    order_key = torch.where(ids >= 0, ids, torch.iinfo(torch.int64).max)
    by_id = order_key.argsort(dim=1, stable=True)
    sims, ids = sims.gather(1, by_id), ids.gather(1, by_id)
    by_score = sims.sort(dim=1, descending=True, stable=True).indices[:, :k]
    return sims.gather(1, by_score), ids.gather(1, by_score)


class ShardedIndex(VectorIndex):
    """One rank's slice of a global index, searched collectively (see the module docstring).

    Args:
        local: this rank's index, holding global ids ``offset ... offset + local.ntotal - 1``.
        offset: the first global id of this rank's slice.
        total: keys over all ranks.

    Every rank must call :meth:`search` and :meth:`fetch` together, as often as the others.
    In a single process (no group) it is ``local`` with ids shifted by ``offset``.
    """

    kind = "sharded"

    def __init__(self, local: VectorIndex, offset: int, total: int) -> None:
        super().__init__(local.dim)
        self.local, self.offset, self.total = local, int(offset), int(total)
        self.exact_scores = local.exact_scores
        ranges = distributed.all_gather_object((self.offset, local.ntotal))
        self.ranges = [(start, start + n) for start, n in ranges]
        covered = sorted(self.ranges)
        if (
            covered[0][0] != 0
            or covered[-1][1] != total
            or any(a[1] != b[0] for a, b in zip(covered, covered[1:]))
        ):
            raise InputError(
                f"the ranks' slices {self.ranges} do not cover ids 0..{total} once each; "
                "give every rank its slice_bounds(total, rank, world)"
            )

    @property
    def ntotal(self) -> int:
        return self.total

    @property
    def is_trained(self) -> bool:
        return self.local.is_trained

    def params(self) -> dict[str, Any]:
        return {"shards": len(self.ranges), "ranges": self.ranges, "local": self.local.describe()}

    def describe(self) -> dict[str, Any]:
        """This rank's local index, with how the ids are split: ``shards`` ranks holding
        ``entries_per_shard`` keys each (what reports print)."""
        sizes = [stop - start for start, stop in self.ranges]
        return {
            **self.local.describe(),
            "ntotal": self.total,
            "shards": len(sizes),
            "entries_per_shard": sizes,
        }

    def _add(self, x: torch.Tensor) -> None:
        raise InputError(
            "a sharded index is fixed by its ranks' slices; add keys to the bank and load it again"
        )

    def search(self, q: Any, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Collective: this rank's queries ``(M, D)`` → ``sims (M, k)``, global ``ids (M, k)``."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InputError(f"ShardedIndex.search: k must be an int >= 1, got {k!r}")
        queries = as_key_matrix(q, self.dim, "search(q)")
        return _finish_results(*self._search(queries, min(k, self.total)), k)

    def _search(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = [int(n) for n in distributed.gather(torch.tensor([q.shape[0]]))]
        width = max(counts)
        padded = torch.zeros(width, self.dim, dtype=torch.float32)
        padded[: q.shape[0]] = q
        gathered = distributed.gather(padded[None])  # (W, width, D)
        everyone = torch.cat([gathered[r, :n] for r, n in enumerate(counts)])  # (Q, D)
        if everyone.shape[0] and self.local.ntotal:
            sims, ids = self.local.search(everyone, k)
            ids = torch.where(ids >= 0, ids + self.offset, ids)
        else:
            sims = torch.full((everyone.shape[0], k), float("-inf"))
            ids = torch.full((everyone.shape[0], k), -1, dtype=torch.int64)
        # (score, id) pairs travel as float64: float32 scores and ids < 2^53 stay exact
        pairs = torch.stack([sims.to(torch.float64), ids.to(torch.float64)], dim=-1)
        chunks = list(pairs.split(counts))
        me = distributed.rank()
        back = distributed.all_to_all(chunks, [(counts[me], k, 2)] * len(counts))
        candidates = torch.cat(back, dim=1)  # (M, W·k, 2)
        return merge_top_k(candidates[..., 0].float(), candidates[..., 1].long(), k)

    def fetch(self, ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Collective: the rows of the ranks' tables for global ``ids (M, k)`` → ``(M, k, C)``.

        ``rows (n, C)`` is this rank's table (row ``j`` belongs to id ``offset + j``): a
        tensor, or anything with ``shape`` whose ``rows[ids]`` gives those rows; each
        owner sends only the rows asked for (id ``-1`` gives zeros).
        """
        world, me = len(self.ranges), distributed.rank()
        flat = ids.reshape(-1)
        wanted, where = flat[flat >= 0].unique(return_inverse=True)
        owner = torch.zeros_like(wanted)
        for r, (start, stop) in enumerate(self.ranges):
            owner[(wanted >= start) & (wanted < stop)] = r
        asks = [wanted[owner == r] for r in range(world)]
        sizes = distributed.all_gather_object([len(a) for a in asks])  # sizes[src][dst]
        received = distributed.all_to_all(asks, [(sizes[src][me],) for src in range(world)])
        answers = [rows[a - self.offset].to(torch.float32) for a in received]
        width = rows.shape[1]
        got = distributed.all_to_all(answers, [(len(a), width) for a in asks])
        table = torch.zeros(len(wanted), width)
        for r in range(world):
            table[owner == r] = got[r]
        out = torch.zeros(flat.shape[0], width)
        out[flat >= 0] = table[where]
        return out.reshape(*ids.shape, width)

    def _save_payload(self, folder: Path) -> None:
        raise InputError(
            "a sharded index is not saved as one folder: each rank builds its slice's index"
        )

    def _load_payload(self, folder: Path) -> None:
        raise InputError("a sharded index is not loaded from one folder")
