"""Seeded ±1 random projection (Achlioptas 2001), generated block by block.

``x ↦ x R / sqrt(m)`` with ``R`` a ``d × m`` matrix of independent ±1 entries: every
output coordinate has variance ``‖x‖² / m``, so ``E ‖x R‖² / m = ‖x‖²`` — norms (and
distances) are preserved in expectation (Johnson–Lindenstrauss).

``R`` is never stored whole: for a ViT-B attention projection ``d = 768 · 769`` and
``m = 768``, which would be 1.8 GB of float32. Rows are split into blocks of
``block_rows``; block ``k`` is drawn from its own generator seeded by ``(seed, k)``, so
any block can be regenerated on demand, in any order, on any device (blocks are drawn on
the CPU, so a GPU gives the same matrix).

Drawing the signs costs far more than using them (for ViT-S/16, 57M draws: ~0.5 s per
call on one CPU thread, against ~0.07 s for projecting 4 gradients), so blocks are kept
after first use, as int8 on the device where they are used (one byte per entry: 454 MB
for ViT-B, instead of 1.8 GB of float32) and converted to the compute dtype per call.
``cache_bytes`` caps that cache; above it blocks are drawn anew on every call.

:meth:`RandomProjection.digest` hashes the drawn signs, so a saved extractor can tell
when this torch draws another matrix from the same seed. :class:`MatrixProjection` uses
a matrix given by the user instead.
"""

from __future__ import annotations

import hashlib
import math

import torch

from hbird.io.seeds import make_generator

BLOCK_ENTRIES = 1 << 21
"""Default entries per generated block (8 MB of float32)."""


def aligned_block_rows(row_width: int, out_dim: int, entries: int = BLOCK_ENTRIES) -> int:
    """A block height that is a multiple of ``row_width`` and holds about ``entries`` entries.

    Gradients of a linear layer are flattened row by row (``D_in + 1`` values per output
    row); blocks made of whole rows let :meth:`RandomProjection.project_outer` project
    outer products without materialising them.
    """
    return row_width * max(1, entries // (row_width * out_dim))


class RandomProjection:
    """``(N, d) → (N, m)``: multiplication by a seeded ±1 matrix scaled by ``1/sqrt(m)``.

    Args:
        in_dim: ``d``.
        out_dim: ``m``.
        seed: the extractor seed (blocks use ``derive_seed(seed, "projection", ..., k)``).
        block_rows: rows of ``R`` generated at once (default: about 2M entries per block).
            Part of the matrix's definition: the same seed with another block height
            gives another matrix.
        cache_bytes: keep the generated blocks (int8, one byte per entry) when the whole
            matrix fits in this many bytes; default 1.5 GiB (ViT-L's attention projection
            to 1024 dims takes 1.07 GB).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        seed: int,
        block_rows: int | None = None,
        cache_bytes: int = 3 << 29,
    ) -> None:
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projection dimensions must be >= 1, got {in_dim} -> {out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.seed = seed
        self.block_rows = block_rows or max(1, BLOCK_ENTRIES // out_dim)
        self.scale = 1.0 / math.sqrt(out_dim)
        self._cacheable = in_dim * out_dim <= cache_bytes
        self._cache: dict[tuple[int, torch.device], torch.Tensor] = {}  # int8 sign blocks
        self._digest: str | None = None

    @property
    def num_blocks(self) -> int:
        return math.ceil(self.in_dim / self.block_rows)

    def config(self) -> dict[str, int | str]:
        return {
            "kind": "seeded",
            "in_dim": self.in_dim,
            "out_dim": self.out_dim,
            "seed": self.seed,
            "block_rows": self.block_rows,
        }

    def digest(self) -> str:
        """SHA-256 of the sign matrix: its int8 ±1 entries, row-major, block after block."""
        if self._digest is not None:
            return self._digest
        sha = hashlib.sha256()
        for k in range(self.num_blocks):
            cached = self._cache.get((k, torch.device("cpu")))
            sha.update((self._draw(k) if cached is None else cached).numpy().tobytes())
        self._digest = sha.hexdigest()
        return self._digest

    def block(
        self,
        index: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Rows ``index·block_rows ...`` of ``R`` (±1, unscaled), ``(rows, m)`` in ``dtype``."""
        return self._signs(index, torch.device(device)).to(dtype)

    def _signs(self, index: int, device: torch.device) -> torch.Tensor:
        """Block ``index`` as int8 ±1 on ``device``, drawn on the CPU or taken from the cache."""
        key = (index, device)
        if key in self._cache:
            return self._cache[key]
        signs = self._draw(index).to(device)
        if self._cacheable:
            self._cache[key] = signs
        return signs

    def _draw(self, index: int) -> torch.Tensor:
        """Block ``index`` drawn anew: int8 ±1 on the CPU."""
        rows = min(self.block_rows, self.in_dim - index * self.block_rows)
        gen = make_generator(
            self.seed, "projection", self.in_dim, self.out_dim, self.block_rows, index
        )
        bits = torch.randint(0, 2, (rows, self.out_dim), generator=gen, dtype=torch.int8)
        return bits.mul_(2).sub_(1)

    def matrix(self) -> torch.Tensor:
        """The whole ``R`` (``(d, m)`` ±1 float32). Only sensible for small ``d · m``."""
        return torch.cat([self.block(k) for k in range(self.num_blocks)])

    def _output(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.dtype]:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.zeros(x.shape[0], self.out_dim, dtype=dtype, device=x.device), dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` → ``(N, m)`` = ``x R / sqrt(m)`` (float32, or float64 for float64 input)."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"projection expects (N, {self.in_dim}) inputs, got {tuple(x.shape)}")
        out, dtype = self._output(x)
        for k in range(self.num_blocks):
            start = k * self.block_rows
            rows = x[:, start : start + self.block_rows].to(dtype)
            out += rows @ self.block(k, x.device, dtype)
        return out * self.scale

    def project_outer(self, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Project ``vec(g_n ⊗ u_n)`` for every ``n`` without forming the ``(N, d)`` matrix.

        Args:
            g: ``(N, R)`` row factors; u: ``(N, C)`` column factors, ``R · C = d``.

        Returns:
            ``(N, m)``, equal to ``self((g[:, :, None] * u[:, None, :]).flatten(1))``.
        """
        n, width = u.shape
        if g.shape[0] != n or g.shape[1] * width != self.in_dim:
            raise ValueError(
                f"outer factors {tuple(g.shape)} and {tuple(u.shape)} do not make {self.in_dim} values"
            )
        if self.block_rows % width:
            raise ValueError(
                f"block_rows={self.block_rows} is not a multiple of the row width {width}; "
                "build the projection with aligned_block_rows(row_width, out_dim)"
            )
        out, dtype = self._output(u)
        g, u = g.to(dtype), u.to(dtype)
        rows_per_block = self.block_rows // width
        for k in range(self.num_blocks):
            first = k * rows_per_block
            part = g[:, first : first + rows_per_block, None] * u[:, None, :]  # (N, r, C)
            out += part.flatten(1) @ self.block(k, u.device, dtype)
        return out * self.scale


class MatrixProjection:
    """``(N, d) → (N, m)``: ``x P`` with a given ``(d, m)`` matrix ``P`` (no scaling).

    Args:
        matrix: ``P``, any real ``(d, m)`` tensor (kept as float32 on the CPU, moved to
            the inputs' device on use).
    """

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or 0 in matrix.shape:
            raise ValueError(f"a projection matrix must be (d, m), got {tuple(matrix.shape)}")
        self.weight = matrix.detach().to("cpu", torch.float32).contiguous()
        self.in_dim, self.out_dim = self.weight.shape

    def config(self) -> dict[str, int | str]:
        return {"kind": "matrix", "in_dim": self.in_dim, "out_dim": self.out_dim}

    def digest(self) -> str:
        """SHA-256 of the matrix's float32 entries, row-major."""
        return hashlib.sha256(self.weight.numpy().tobytes()).hexdigest()

    def matrix(self) -> torch.Tensor:
        return self.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` → ``(N, m)`` = ``x P`` (float32, or float64 for float64 input)."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"projection expects (N, {self.in_dim}) inputs, got {tuple(x.shape)}")
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.to(dtype) @ self.weight.to(x.device, dtype)
