"""Decoding: eq. 1 of Balazevic et al. (2023), then upsampling to the query's size.

For a query patch feature ``q`` and its ``k`` retrieved memory entries with keys
``k_i`` and values ``v_i`` (§3.1, eq. 1)::

    ŷ = Σ_i softmax_i( cos(q, k_i) / β ) · v_i

The patch-level soft labels ``(h, w, C)`` are bilinearly upsampled to the query
image's original size ``(H, W)``; segmentation takes the argmax (confidence = the
winning class's upsampled weight), regression takes the values themselves
(confidence = the softmax weight of the closest neighbour, upsampled).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hbird.threads import cpu_threads


def neighbour_attention(
    queries: torch.Tensor,
    neighbour_keys: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax weights of eq. 1.

    Args:
        queries: ``(Q, D)`` query patch features (normalised here).
        neighbour_keys: ``(Q, k, D)`` keys of each query's neighbours (normalised here).
        temperature: β > 0.
        valid: optional ``(Q, k)`` bool; False entries (padding) get zero weight.

    Returns:
        ``(Q, k)`` float32 weights summing to 1 over ``k``.
    """
    q = F.normalize(queries.to(torch.float32), dim=-1)
    keys = F.normalize(neighbour_keys.to(torch.float32), dim=-1)
    cosines = torch.einsum("qd,qkd->qk", q, keys)  # (Q, k)
    return softmax_over_neighbours(cosines, temperature, valid)


def softmax_over_neighbours(
    cosines: torch.Tensor, temperature: float, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Eq. 1's weights from the cosines themselves: ``softmax_k(cos / β)``.

    Args:
        cosines: ``(Q, k)`` cosine similarity of each query to each of its neighbours.
        temperature: β > 0.
        valid: optional ``(Q, k)`` bool; False entries (padding) get zero weight.

    Returns:
        ``(Q, k)`` float32 weights summing to 1 over ``k``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = cosines.to(torch.float32) / temperature
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    return torch.softmax(logits, dim=-1)


def aggregate(weights: torch.Tensor, neighbour_values: torch.Tensor) -> torch.Tensor:
    """``(Q, k)`` weights × ``(Q, k, C)`` values → ``(Q, C)`` soft labels."""
    return torch.einsum("qk,qkc->qc", weights, neighbour_values.to(torch.float32))


def upsample(patch_labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(h, w, C)`` patch-level labels → ``(C, H, W)`` by bilinear interpolation."""
    x = _channels_first(patch_labels)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)[0]


def _channels_first(patch_labels: torch.Tensor) -> torch.Tensor:
    """``(h, w, C)`` → float32 ``(1, C, h, w)`` (a view: channels-last in memory)."""
    return patch_labels.permute(2, 0, 1)[None].to(torch.float32)


def upsample_argmax(
    patch_labels: torch.Tensor, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, w, C)`` soft labels → ``(H, W)`` winning class's upsampled value and its id.

    Bit for bit ``upsample(patch_labels, size).max(dim=0)`` (ties: the first class), without
    the ``(C, H, W)`` map: output rows are computed in tiles of about a megabyte with the
    float32 arithmetic of the CPU kernel torch picks for that call (:func:`_torch_kernel`,
    :func:`_linear_taps`, :func:`_lerp`, :func:`_channels_last_rows`), and each tile is
    reduced at once, on one thread (its ~10 small ops a tile lose more to fork/join on two
    threads of a busy machine than they gain). Falls back to :func:`upsample` for
    non-finite or huge inputs, on an unknown CPU, and if a one-off check on this build
    finds the two differ.
    """
    x = _channels_first(patch_labels)
    kernel = _torch_kernel(x, size)  # at the caller's thread count, as F.interpolate sees it
    if kernel is not None and _exact_here(x) and _rows_match_torch():
        with cpu_threads(1):  # ~10 small ops a tile: fork/join on more threads costs more
            return _tiled_max(x[0], size, kernel)
    return upsample(patch_labels, size).max(dim=0)


_TILE_ELEMENTS = 1 << 18  # float32 elements per tile (C × rows × W): 1 MiB, cache-sized
# Channels the channels-last kernel sums in vector order come in multiples of this per CPU:
# torch's 16-float AVX512 loop, then the compiler's 8-float vectorization of its remainder
# (measured on this build; other CPUs fall back to the oracle).
_VECTOR_FLOATS = {"AVX512": 8}


def _torch_kernel(x: torch.Tensor, size: tuple[int, int]) -> str | None:
    """Which CPU kernel ``F.interpolate(x, size, "bilinear")`` runs for the ``(1, C, h, w)``
    float32 ``x`` (torch's dispatch rule, UpSampleKernel.cpp): ``"channels_last"`` (more
    than 3 channels stored channels-last, small outputs, 3 channels on one thread), else
    ``"generic"``; None (not reproduced) off the CPU (a GPU's kernels round otherwise),
    where the vector width is unknown, or where ``x`` is not stored channels-last, as
    ``(h, w, C)`` soft labels permuted are."""
    if x.device.type != "cpu" or not x.is_contiguous(memory_format=torch.channels_last):
        return None
    c, small = x.shape[1], size[0] + size[1] <= 128
    if c > 3 or small or (torch.get_num_threads() == 1 and c == 3):
        known = torch.backends.cpu.get_cpu_capability() in _VECTOR_FLOATS
        return "channels_last" if known else None
    return "generic"


def _tiled_max(
    x: torch.Tensor, size: tuple[int, int], kernel: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C, h, w)`` → ``max(dim=0)`` of its bilinear upsampling, a tile of rows at a time.

    The columns are interpolated (generic kernel) or gathered (channels-last kernel) once,
    ``(C, h, W)``; each tile of output rows is then computed from its source rows. Per tile
    the first winning class is found without bool compares or ``max(dim)`` (several times
    slower here): ``d = tile − amax`` is +0 exactly at the maxima and negative elsewhere,
    so read as int32 it is 0 there and at most −2²³ − 1 elsewhere; with ``C < 2²³``
    classes, ``d + (C − c)`` is then largest at the first maximum."""
    c, (height, width) = x.shape[0], size
    i0, i1, w0, w1 = _linear_taps(x.shape[2], width)
    columns = x.transpose(1, 2).contiguous()  # (C, w, h): gathering rows is the fast way
    left = columns.index_select(1, i0).transpose(1, 2).contiguous()  # (C, h, W)
    right = columns.index_select(1, i1).transpose(1, 2).contiguous()
    if kernel == "generic":
        left, right = _lerp(left, w0, right, w1), None  # (C, h, W) along the width
    sources = [t for t in (left, right) if t is not None]
    r0, r1, v0, v1 = _linear_taps(x.shape[1], height)
    values = torch.empty(height, width, dtype=torch.float32)
    labels = torch.empty(height, width, dtype=torch.int64)
    countdown = torch.arange(c, 0, -1, dtype=torch.int32)[:, None, None]  # C − c
    for start, stop, shared in _row_tiles(r0, r1, max(1, _TILE_ELEMENTS // (c * width))):
        rows = slice(start, stop)
        top = [_source_rows(t, r0[rows], shared) for t in sources]  # (C, rows | 1, W)
        bottom = [_source_rows(t, r1[rows], shared) for t in sources]
        h0, h1 = v0[rows, None], v1[rows, None]
        if kernel == "generic":
            tile = _lerp(top[0], h0, bottom[0], h1)
        else:
            corners = [top[0], top[1], bottom[0], bottom[1]]
            tile = _channels_last_rows(corners, [h0 * w0, h0 * w1, h1 * w0, h1 * w1])
        best = tile.amax(dim=0)  # (rows, W)
        first = torch.sub(tile, best).view(torch.int32).add_(countdown).amax(dim=0)
        labels[rows] = c - first
        values[rows] = tile.gather(0, labels[None, rows])[0]  # the first winner's own bits
    return values, labels


def _source_rows(t: torch.Tensor, rows: torch.Tensor, shared: bool) -> torch.Tensor:
    """Rows ``rows`` of ``t (C, h, W)``: ``(C, 1, W)``, a view, when they are all one row
    (``shared``), else ``(C, len(rows), W)`` gathered."""
    return t[:, rows[0], None] if shared else t.index_select(1, rows)


_MIN_SHARED_ROWS = 4  # a run of output rows this long between two source rows is one tile


def _row_tiles(r0: torch.Tensor, r1: torch.Tensor, step: int) -> list[tuple[int, int, bool]]:
    """Output row tiles ``(start, stop, shared)`` of at most ``step`` rows: a long run of
    rows with the same two source rows ``(r0, r1)`` (``shared``: broadcast, no copy), or
    consecutive short runs gathered together (downsampling, small scale factors)."""
    n = len(r0)
    change = torch.ones(n, dtype=torch.bool)
    change[1:] = (r0[1:] != r0[:-1]) | (r1[1:] != r1[:-1])
    bounds = change.nonzero().flatten().tolist() + [n]
    tiles: list[tuple[int, int, bool]] = []
    pending = None  # start of the short runs gathered so far
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a >= _MIN_SHARED_ROWS:
            if pending is not None:
                tiles.append((pending, a, False))
                pending = None
            tiles += [(s, min(s + step, b), True) for s in range(a, b, step)]
            continue
        pending = a if pending is None else pending
        if b - pending >= step:
            tiles.append((pending, b, False))
            pending = None
    if pending is not None:
        tiles.append((pending, n, False))
    return tiles


def _linear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """Source indices ``i0, i1`` and weights ``w0, w1`` (each ``(n_out,)``) of linear
    interpolation with ``align_corners=False``, computed as torch's CPU kernel does:
    ``src = max(0, s·(o + ½) − ½)`` with ``s = n_in / n_out`` in float32 and one rounding
    (a fused multiply-add), ``i0 = min(⌊src⌋, n_in − 1)``, ``i1 = i0 + 1`` inside the
    input else ``i0``, ``w1 = clamp(src − i0, 0, 1)``, ``w0 = 1 − w1``; equal sizes copy."""
    out = torch.arange(n_out)
    if n_in == n_out:
        return out, out, torch.ones(n_out), torch.zeros(n_out)
    scale = torch.tensor(n_in, dtype=torch.float32) / n_out
    # float64 holds s·(o + ½) − ½ exactly, so one rounding to float32 is the fused result
    src = (scale.double() * (out.double() + 0.5) - 0.5).float().clamp_min(0)
    i0 = src.floor().long().clamp_max(n_in - 1)
    w1 = (src - i0).clamp(0, 1)
    return i0, torch.where(i0 < n_in - 1, i0 + 1, i0), 1 - w1, w1


def _lerp(a: torch.Tensor, w0: torch.Tensor, b: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """``fma(a, w0, b · w1)``: the generic kernel's rounding (``addcmul`` is one fused
    multiply-add on this build; :func:`_rows_match_torch` checks)."""
    return torch.addcmul(b * w1, a, w0)


def _channels_last_rows(corners: list[torch.Tensor], weights: list[torch.Tensor]) -> torch.Tensor:
    """The channels-last kernel's sum of the four corners ``a00, a01, a10, a11`` (each
    ``(C, rows | 1, W)``) with weights ``w00 = h0·w0, …`` (each ``(rows, W)``): vectorized
    channels ``fma(a00, w00, fma(a01, w01, fma(a11, w11, a10·w10)))``, the last
    ``C mod 8`` (scalar) ones ``fma(a11, w11, fma(a10, w10, fma(a00, w00, a01·w01)))``."""
    a00, a01, a10, a11 = corners
    w00, w01, w10, w11 = weights
    c = a00.shape[0]
    vectorized = c - c % _VECTOR_FLOATS[torch.backends.cpu.get_cpu_capability()]
    tile = torch.empty(c, *w00.shape, dtype=torch.float32)
    head, tail = tile[:vectorized], tile[vectorized:]
    v, t = slice(0, vectorized), slice(vectorized, c)
    torch.mul(a10[v], w10, out=head).addcmul_(a11[v], w11).addcmul_(a01[v], w01)
    head.addcmul_(a00[v], w00)
    torch.mul(a01[t], w01, out=tail).addcmul_(a00[t], w00).addcmul_(a10[t], w10)
    tail.addcmul_(a11[t], w11)
    return tile


def _exact_here(x: torch.Tensor) -> bool:
    """Fewer than 2²³ classes (:func:`_tiled_max`'s integer trick), inputs below 1e38 in
    magnitude so every upsampled value is finite (NaN, inf and overflow follow torch's
    own reduction: the oracle handles them), and denormals kept (not
    ``torch.set_flush_denormal(True)``, which the check on this build did not see)."""
    if x.numel() == 0 or x.shape[1] >= 1 << 23:
        return False
    return bool(x.abs().amax() < 1e38) and bool(torch.tensor(1e-40) * 1.0 != 0)


_CHECKED: dict[str, bool] = {}


def _rows_match_torch() -> bool:
    """Once per process: the tiled path equals ``upsample`` + ``max`` on random probes
    for both kernels, with non-integer scales, clamped borders and vector-tail channels
    (else this build's arithmetic differs from the one reproduced here)."""
    if "ok" not in _CHECKED:
        gen = torch.Generator().manual_seed(0)
        ok = True
        for c in (2, 21, 31):  # generic; 16 + 5 scalar; 16 + 8 + 7 scalar channels
            probe, size = torch.rand(7, 4, c, generator=gen), (61, 93)
            x = _channels_first(probe)
            want = upsample(probe, size).max(dim=0)
            got = _tiled_max(x[0], size, _torch_kernel(x, size) or "generic")
            ok = ok and torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
        _CHECKED["ok"] = ok
    return _CHECKED["ok"]


@dataclass
class DensePrediction:
    """One query image's prediction at its original size.

    Attributes:
        labels: ``(H, W)`` int64 class ids (segmentation) or ``(H, W)`` / ``(H, W, C)``
            float32 values (depth, regression).
        confidence: ``(H, W)`` float32 in [0, 1].
        patch_labels: ``(h, w, C)`` the soft labels before upsampling.
    """

    labels: torch.Tensor
    confidence: torch.Tensor
    patch_labels: torch.Tensor


def decode_dense(
    patch_labels: torch.Tensor,
    size: tuple[int, int],
    classification: bool,
    patch_confidence: torch.Tensor | None = None,
) -> DensePrediction:
    """Upsample ``(h, w, C)`` soft labels to ``size`` and read off labels and confidence.

    Args:
        patch_labels: ``(h, w, C)`` eq.-1 outputs.
        size: the query's original ``(H, W)``.
        classification: argmax over classes if True, else values.
        patch_confidence: ``(h, w)`` per-patch confidence for regression (e.g. top weight).
    """
    if classification:
        confidence, labels = upsample_argmax(patch_labels, size)  # (H, W) each
        return DensePrediction(labels.to(torch.int64), confidence, patch_labels)
    up = upsample(patch_labels, size)  # (C, H, W)
    values = up[0] if up.shape[0] == 1 else up.permute(1, 2, 0)
    if patch_confidence is None:
        confidence = torch.ones(size, dtype=torch.float32)
    else:
        confidence = upsample(patch_confidence[..., None], size)[0]
    return DensePrediction(values.contiguous(), confidence, patch_labels)
