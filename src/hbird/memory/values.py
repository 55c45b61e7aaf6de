"""How a bank stores its values ``(N, C)``: dense rows, or sparse (class, weight) slots.

A segmentation value is a patch's class histogram (``memory.labels``); most patches hold
one class and nearly all at most two. At ADE20K's 150 classes a dense float32 row costs
600 bytes, so the paper's 10M-entry memory needs 6 GB for its values alone.

``sparse`` keeps, per entry, :data:`SLOTS` ``(class int16, weight float32)`` pairs:
12 bytes an entry. Rows with more non-zero classes than slots keep their dense row
beside (``overflow``: its entry id and the row), so the storage is lossless: every
gathered row equals the dense one bit for bit, and so does eq. 1 over it.

Shard file tensors:

- dense:  ``values (n, C) float32``;
- sparse: ``value_classes (n, S) int16``, ``value_weights (n, S) float32``,
  ``value_overflow_rows (m,) int64`` (row within the shard, ascending) and
  ``value_overflow (m, C) float32``.
"""

from __future__ import annotations

import torch

from hbird.memory.rows import Rows

STORAGES = ("dense", "sparse")
SLOTS = 2
"""(class, weight) pairs per entry of sparse values."""
PER_ENTRY = ("values", "value_classes", "value_weights")
"""Shard tensors with one row per entry (sliced with the entries); the rest are read whole."""


class DenseValues:
    """``(N, C)`` float32 rows, as they are."""

    storage = "dense"

    def __init__(self, value_dim: int) -> None:
        self.value_dim = int(value_dim)
        self._rows = Rows((self.value_dim,), torch.float32)

    def __len__(self) -> int:
        return len(self._rows)

    def reserve(self, entries: int) -> None:
        self._rows.reserve(entries)

    def append(self, values: torch.Tensor) -> None:
        """Add ``values (n, C)`` (cast to float32)."""
        self._rows.append(values)

    def dense(self) -> torch.Tensor:
        """``(N, C)`` float32 (the stored rows themselves)."""
        return self._rows.tensor()

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids (...)`` (valid entry ids) → ``(..., C)`` float32."""
        return self.dense()[ids]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the entries where ``keep (N,)`` bool is True, in order."""
        self._rows.replace(self.dense()[keep])

    def clear(self) -> None:
        self._rows.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shard file's tensors for the entries held."""
        return {"values": self.dense()}

    def extend(self, shard: dict[str, torch.Tensor], total: int, first: int = 0) -> None:
        """Add one shard's (or slice's) values to a bank of ``total`` entries."""
        extend_column(self._rows, shard["values"], total)

    def entry_bytes(self) -> float:
        """Bytes per entry held in memory (0 when empty)."""
        return 4.0 * self.value_dim if len(self) else 0.0


class SparseValues:
    """Per entry :data:`SLOTS` (class, weight) pairs, plus the dense rows that need more."""

    storage = "sparse"

    def __init__(self, value_dim: int) -> None:
        self.value_dim = int(value_dim)
        index_dtype = torch.int16 if self.value_dim <= torch.iinfo(torch.int16).max else torch.int32
        self.slots = min(SLOTS, self.value_dim)  # (class, weight) pairs per entry
        self._classes = Rows((self.slots,), index_dtype)
        self._weights = Rows((self.slots,), torch.float32)
        self._overflow_rows = Rows((), torch.int64)  # entry ids, ascending
        self._overflow = Rows((self.value_dim,), torch.float32)

    def __len__(self) -> int:
        return len(self._classes)

    def reserve(self, entries: int) -> None:
        self._classes.reserve(entries)
        self._weights.reserve(entries)

    def append(self, values: torch.Tensor) -> None:
        """Add ``values (n, C)``: their top :data:`SLOTS` classes, and the whole row of
        those with more non-zero classes than that."""
        values = values.to(torch.float32)
        classes = values.abs().topk(self.slots, dim=1).indices  # distinct; every non-zero
        weights = values.gather(1, classes)  # of a row with at most `slots` of them
        more = (values != 0).sum(dim=1) > self.slots
        weights = weights.masked_fill(more[:, None], 0.0)  # read from the overflow instead
        rows = more.nonzero()[:, 0]
        self._overflow_rows.append(rows + len(self))
        self._overflow.append(values[rows])
        self._classes.append(classes)
        self._weights.append(weights)

    def gather(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of ``ids (...)`` (valid entry ids) → ``(..., C)`` float32, equal to the
        dense rows: the slots scattered into zeros, overflow rows copied whole."""
        flat = ids.reshape(-1)
        out = torch.zeros(flat.shape[0], self.value_dim)
        classes = self._classes.tensor()[flat].to(torch.int64)
        out.scatter_(1, classes, self._weights.tensor()[flat])
        overflow_rows = self._overflow_rows.tensor()
        if overflow_rows.numel():
            at = torch.searchsorted(overflow_rows, flat).clamp_max(overflow_rows.numel() - 1)
            hit = overflow_rows[at] == flat
            out[hit] = self._overflow.tensor()[at[hit]]
        return out.reshape(*ids.shape, self.value_dim)

    def dense(self) -> torch.Tensor:
        """``(N, C)`` float32, built here (N × C × 4 bytes: what sparse storage avoids)."""
        return self.gather(torch.arange(len(self)))

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the entries where ``keep (N,)`` bool is True, in order."""
        self._classes.replace(self._classes.tensor()[keep])
        self._weights.replace(self._weights.tensor()[keep])
        rows = self._overflow_rows.tensor()
        kept = keep[rows]
        new_ids = keep.cumsum(0) - 1  # an entry's id among those kept
        self._overflow_rows.replace(new_ids[rows[kept]])
        self._overflow.replace(self._overflow.tensor()[kept])

    def clear(self) -> None:
        for column in (self._classes, self._weights, self._overflow_rows, self._overflow):
            column.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        """The shard file's tensors for the entries held (overflow rows within them)."""
        return {
            "value_classes": self._classes.tensor(),
            "value_weights": self._weights.tensor(),
            "value_overflow_rows": self._overflow_rows.tensor(),
            "value_overflow": self._overflow.tensor(),
        }

    def extend(self, shard: dict[str, torch.Tensor], total: int, first: int = 0) -> None:
        """Add one shard's values to a bank of ``total`` entries; ``first``: the shard row
        of the first entry read (the per-entry tensors are already sliced from it)."""
        start, n = len(self), shard["value_classes"].shape[0]
        extend_column(self._classes, shard["value_classes"], total)
        extend_column(self._weights, shard["value_weights"], total)
        local = shard["value_overflow_rows"]
        inside = (local >= first) & (local < first + n)
        self._overflow_rows.append(local[inside] - first + start)
        self._overflow.append(shard["value_overflow"][inside])

    def entry_bytes(self) -> float:
        """Bytes per entry held in memory, overflow included (0 when empty)."""
        if not len(self):
            return 0.0
        columns = (self._classes, self._weights, self._overflow_rows, self._overflow)
        held = sum(c.tensor().numel() * c.tensor().element_size() for c in columns)
        return held / len(self)


def create_values(storage: str, value_dim: int) -> DenseValues | SparseValues:
    """A values store by name (:data:`STORAGES`)."""
    if storage not in STORAGES:
        raise ValueError(f"value storage must be one of {', '.join(STORAGES)}, not {storage!r}")
    return SparseValues(value_dim) if storage == "sparse" else DenseValues(value_dim)


def extend_column(column: Rows, piece: torch.Tensor, total: int) -> None:
    """Add one shard's ``piece`` to ``column`` of a bank of ``total`` entries: kept as it
    is when it is the whole bank, else copied into one block for all ``total`` rows."""
    if len(column) == 0 and piece.shape[0] == total:
        column.replace(piece)
        return
    if len(column) == 0:
        column.reserve(total)
    column.append(piece)
