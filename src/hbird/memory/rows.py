"""A growing ``(N, *row)`` tensor written in place into a few large, preallocated blocks.

A bank gathers its entries image by image. Keeping each image's rows as its own small
tensor and concatenating them at the end costs twice the bank's memory at that moment,
and the many small pieces, interleaved with the encoder's temporaries, fragment the
heap (a 300-scene build held 1.6× "bank + one batch"). :class:`Rows` copies each piece
into a block allocated once for many rows (``reserve``, or geometric growth: a new block
as large as everything so far); an allocation that large is mapped memory whose untouched
pages cost nothing, so memory grows with the rows written, not with the capacity.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch

MIN_BLOCK_ROWS = 1 << 16
"""The smallest block a growing :class:`Rows` allocates (unless told a size)."""


class Rows:
    """Rows of one shape and dtype, appended piece by piece.

    Args:
        row_shape: the shape of one row (``(D,)`` for keys, ``()`` for ids).
        dtype: their dtype.

    :meth:`tensor` returns the filled rows as one contiguous ``(N, *row_shape)`` tensor:
    a view of the block when they fit in one (the usual case after :meth:`reserve`),
    else the blocks copied once into one (each freed as soon as it is copied).
    """

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self._blocks: list[torch.Tensor] = []  # each (capacity_i, *row_shape)
        self._filled: list[int] = []  # rows written into each block
        self._reserved = 0
        self._own_first = False  # the first block was allocated here (may be written over)

    def __len__(self) -> int:
        return sum(self._filled)

    def reserve(self, rows: int) -> None:
        """Make the next block hold at least ``rows`` rows (allocated when first written)."""
        self._reserved = max(int(rows), 0)

    def append(self, x: torch.Tensor) -> None:
        """Copy ``x (n, *row_shape)`` (cast to :attr:`dtype`) after the rows already held."""
        n = x.shape[0]
        if n == 0:
            return
        if not self._blocks or self._filled[-1] + n > self._blocks[-1].shape[0]:
            grown = max(len(self), MIN_BLOCK_ROWS)
            capacity = max(n, self._reserved or grown)
            self._blocks.append(torch.empty((capacity, *self.row_shape), dtype=self.dtype))
            self._filled.append(0)
            self._own_first = self._own_first or len(self._blocks) == 1
            self._reserved = 0
        start = self._filled[-1]
        self._blocks[-1][start : start + n] = x
        self._filled[-1] = start + n

    def tensor(self) -> torch.Tensor:
        """The ``(N, *row_shape)`` rows written so far, contiguous."""
        if len(self._blocks) > 1:  # into one, each block freed once copied
            out = torch.empty((len(self), *self.row_shape), dtype=self.dtype)
            start = 0
            while self._blocks:
                n = self._filled.pop(0)
                out[start : start + n] = self._blocks.pop(0)[:n]
                start += n
            self.replace(out)
        if not self._blocks:
            return torch.empty((0, *self.row_shape), dtype=self.dtype)
        return self._blocks[0][: self._filled[0]]

    def replace(self, x: torch.Tensor) -> None:
        """Hold exactly ``x (N, *row_shape)`` (kept as it is, not copied)."""
        self._blocks, self._filled, self._own_first = [x], [x.shape[0]], False

    def clear(self) -> None:
        """Forget every row; a first block allocated here is kept to be written over."""
        keep = self._blocks[:1] if self._own_first else []
        self._blocks, self._filled = keep, [0] * len(keep)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where there is none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the allocator's free pages back to the OS (glibc's ``malloc_trim``; a no-op
    elsewhere). Called between a bank build's batches: glibc serves a batch's medium-size
    temporaries from its heap and keeps the freed pages, and over a few hundred images
    that heap grows past one batch's need; trimmed, a build holds the bank's rows plus
    one batch (``benchmarks/eval.py --bank-only``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
