"""A bf16 first pass whose error is bounded, so an exact search can trust it.

``ExactIndex(scoring="bf16")`` scores every key with float32 matmuls run in oneDNN's
bf16 mode (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``: AMX tiles, about
twice float32's rate here) on inputs already rounded to bf16, keeps ``kc`` candidates
per query, proves for each query that the float32 top ``k`` is among them, re-scores
them in float32, and searches the queries it cannot prove for again in float32.

**The approximation.** Queries ``q`` and keys ``x`` are float32 (float16 keys convert
exactly); ``μ`` is the keys' mean, ``bf(v)`` rounds to the nearest bf16 (8 significant
bits). Since ``q·x = (q − μ)·(x − μ) + μ·x + (q·μ − μ·μ)`` and the last term is the same
for every key of a query, keys are ranked by

    r(x) = (q − μ)·(x − μ) + μ·x.

Centring both sides matters: patch features share a large common component
(``|μ| ≈ 0.96 |x|`` on ViT-S features), so ``|x − μ|`` is a quarter of ``|x|`` and
every error term below shrinks with it. One matmul row pair computes, for a key in
band ``b`` (keys are grouped by ``|x − μ|`` in powers of two),

    u(x) = fl( Q·K + h1 + h2 + h3 + β_b ),   Q = bf(fl(q − μ)),  K = bf(fl(x − μ)),

as ``[Q, 1, 1, 1, β_b] · [K, h1, h2, h3, 1]``, where ``h1 + h2 + h3`` are bf16 parts of
``μ·x`` (computed in float64) and ``β_b(q) >= B_b(q)`` is the band's error bound
(below), rounded up to bf16. So ``u`` is an upper bound of ``r``, and ``u − 2β_b`` a
lower one.

**The bound.** With ``q' = q − μ``, ``x' = x − μ`` (exact), ``e_q = |q' − Q|`` and
``e_x = |x' − K|`` (``e_q`` in float64; ``e_x`` and the key norms bounded from float32
norms, scaled up by their own rounding: ``bound_tables``; the roundings of
``fl(q − μ)`` and ``fl(x − μ)`` are inside them):

    q'·x' − Q·K = (q' − Q)·x' + Q·(x' − K),   so  |q'·x' − Q·K| <= e_q |x'| + |Q| e_x   (1)

by Cauchy-Schwarz; ``|μ·x − (h1 + h2 + h3)| <= ρ_x``, the split's float64 remainder
plus ``D·2^-52·|μ|·|x|`` for the float64 dot product. Bf16 × bf16 products are exact in
float32, so the matmul adds only float32 accumulation error: summed in any order, at
most ``γ_n · Σ |terms|`` with ``γ_n = n·u / (1 − n·u)``, ``u = 2^-24``, ``n`` the padded
inner size (Higham, *Accuracy and Stability of Numerical Algorithms*, eq. 3.5), and
``Σ |terms| <= |Q| |K| + Σ|h| + β``. AMX flushes subnormals to zero: at most ``2^-126``
per product and per addition. With the band's maxima ``A_b = max |x'|``,
``E_b = max e_x``, ``K_b = max |K|``, ``H_b = max Σ|h|``, ``P_b = max ρ_x``:

    |r(x) − (u(x) − β_b)| <= B_b = e_q A_b + |Q| E_b + P_b
                                  + γ_n (|Q| K_b + H_b + β_b) + n·2^-125 (1 + |Q| + K_b + H_b)   (2)

and ``β_b = bf16_up(B_b⁰ / (1 − γ_n))`` (``B_b⁰``: (2) without its ``β_b`` term) is
``>= B_b``, so ``r(x) <= u(x)`` and ``r(x) >= ℓ(x) = u(x) − 2β_b``.

**The certificate.** The float32 oracle computes ``g(x) = fl(q·x)``, off by at most
``G = γ_D·|q|·max|x|`` from ``q·x``. Let the candidates ``C`` be the ``kc`` keys of
largest ``u``, ``u_kc`` the ``kc``-th largest ``u`` and ``ℓ_k`` the ``k``-th largest
``ℓ`` over ``C``. If every key is a candidate, or

    u_kc < ℓ_k − 2G,                                                              (3)

then for a key ``x`` outside ``C`` and each of the ``k`` candidates ``y`` with
``ℓ(y) >= ℓ_k`` (``c_q = q·μ − μ·μ``): ``g(x) <= r(x) + c_q + G <= u_kc + c_q + G
< ℓ_k + c_q − G <= r(y) + c_q − G <= g(y)``. So ``x`` is strictly below ``k`` candidates
in the oracle's own float32 scores: the oracle's top ``k``, ties at its cut included,
lies in ``C``. Re-scored in float32 (each dot product rounds as the oracle's matmul
does with MKL here; the tests compare bit for bit) and sorted by (score, id), ``C``
gives the oracle's result. Queries for which (3) fails are searched in float32.

The bound is a worst case (Cauchy-Schwarz assumes the rounding residuals line up with
the vectors; measured errors are 10–30× smaller), so (3) passes when fewer than ``kc``
keys lie within about ``2β + 2G`` of the ``k``-th. ``docs/performance.md`` ("Exact
search") has the measured pass rates.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

UNIT_ROUNDOFF = 2.0**-24
"""float32's unit roundoff ``u``."""
SUBNORMAL = 2.0**-125
"""Twice the smallest normal float32: the most a flushed subnormal changes a product or a sum."""
SAFETY = 1 + 2.0**-30
"""Covers the float64 rounding of the norms in (2) (relative ``D·2^-53`` at most)."""
EXTRA = 5
"""Columns after the ``D`` centred ones: three parts of ``μ·x``, the band's ``β``, and one
left zero; the width is then padded to a multiple of 32 (AMX's bf16 tile depth)."""


def gamma(n: int) -> float:
    """``γ_n = n·u / (1 − n·u)``: the relative error bound of an ``n``-term float32 sum."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def padded_width(dim: int) -> int:
    """Inner size ``n`` of the first pass's matmul for ``dim``-dimensional vectors."""
    return 32 * math.ceil((dim + EXTRA) / 32)


def bf16_round(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to the nearest bf16 value, as float32."""
    return x.to(torch.bfloat16).to(torch.float32)


def bf16_round_up(x: torch.Tensor) -> torch.Tensor:
    """The nearest bf16 value ``>= x`` or above, for ``x >= 0`` (float64 in), as float32:
    ``x·(1 + 2^-7)`` exceeds ``x`` by more than half a bf16 step, so its nearest bf16
    value is still ``>= x``."""
    return (x * (1 + 2.0**-7)).to(torch.bfloat16).to(torch.float32)


@contextlib.contextmanager
def bf16_matmul() -> Iterator[None]:
    """float32 matmuls run by oneDNN in bf16 (AMX on this CPU) inside the block; the
    process-wide setting is restored afterwards, even on error."""
    setting = torch.backends.mkldnn.matmul
    before = setting.fp32_precision
    setting.fp32_precision = "bf16"
    try:
        yield
    finally:
        setting.fp32_precision = before


@dataclass(frozen=True)
class BoundTables:
    """The keys' side of the first pass and of (2), for ``N`` keys.

    Attributes:
        centre: ``μ (D,)`` float32.
        mass: ``(N, 3)`` float32 bf16 parts ``h1, h2, h3`` of each key's ``μ·x``.
        bands: ``(N,)`` int64 band of each key (``floor(log2 |x − μ|)``, shifted to 0).
        order: ``(N,)`` int64 key ids band by band, in id order within a band.
        starts: ``(bands + 1,)`` where each band's ids start in ``order``.
        maxima: ``(bands, 5)`` float64 ``A_b, E_b, K_b, H_b, P_b`` of (2).
        norm: ``max |x|`` (for ``G``).
    """

    centre: torch.Tensor
    mass: torch.Tensor
    bands: torch.Tensor
    order: torch.Tensor
    starts: list[int]
    maxima: torch.Tensor
    norm: float


def centre_and_round(x: torch.Tensor, centre: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``bf(fl(x − μ))`` of ``x (c, D)`` (any float dtype) into ``out[:c, :D]``; returns it."""
    rows = out[: x.shape[0], : x.shape[1]]
    rows.copy_(x).sub_(centre)
    return rows.copy_(rows.to(torch.bfloat16))


def bound_tables(chunks: list[torch.Tensor], dim: int) -> BoundTables:
    """``BoundTables`` of the keys given as ``chunks (c_i, D)`` in id order (views)."""
    count = sum(x.shape[0] for x in chunks)
    total = torch.zeros(dim, dtype=torch.float64)
    for x in chunks:
        total += x.sum(0, dtype=torch.float32).to(torch.float64)  # any centre is valid
    centre = (total / max(count, 1)).to(torch.float32)
    centre64 = centre.to(torch.float64)
    mass = torch.empty(count, 3)
    per_key = torch.empty(count, 6, dtype=torch.float64)  # |x'|, e_x, |K|, Σ|h|, ρ, |x|
    # norms in float32 are within γ_{D+2} of the true ones (a D-term sum of squares and
    # a square root), so they are scaled up by that; x' = x − μ is fl(x − μ) to within
    # u|x'| per component, and fl(x − μ) − K is exact (a rounding residual), so
    # |x'| <= |fl(x − μ)| / (1 − u) and e_x <= |fl(x − μ) − K| + u|x'|
    widen = 1 + 2 * gamma(dim + 2)
    start = 0
    for x in chunks:
        c = x.shape[0]
        x32 = x.to(torch.float32)
        centred = x32 - centre  # fl(x − μ)
        rounded = bf16_round(centred)  # K
        dot = x32.to(torch.float64) @ centre64  # (c,) μ·x in float64
        rest, parts = dot.clone(), []
        for _ in range(3):
            part = rest.to(torch.bfloat16).to(torch.float64)
            parts.append(part)
            rest = rest - part
        mass[start : start + c] = torch.stack(parts, 1).to(torch.float32)
        norm = x32.norm(dim=1).to(torch.float64) * widen
        centred_norm = centred.norm(dim=1).to(torch.float64) * widen / (1 - UNIT_ROUNDOFF)
        residual = (centred - rounded).norm(dim=1).to(torch.float64) * widen
        per_key[start : start + c] = torch.stack(
            [
                centred_norm,
                residual + UNIT_ROUNDOFF * centred_norm,
                rounded.norm(dim=1).to(torch.float64) * widen,
                torch.stack(parts, 1).abs().sum(1),
                rest.abs() + dim * 2.0**-52 * centre64.norm() * norm,
                norm,
            ],
            1,
        )
        start += c
    bands = per_key[:, 0].clamp(min=2.0**-20).log2().floor().to(torch.int64)
    bands -= int(bands.min()) if count else 0
    order = torch.argsort(bands, stable=True)
    sizes = torch.bincount(bands, minlength=int(bands.max()) + 1 if count else 1)
    starts = [0, *sizes.cumsum(0).tolist()]
    maxima = torch.zeros(sizes.shape[0], 5, dtype=torch.float64)  # norms are >= 0
    maxima.scatter_reduce_(0, bands[:, None].expand(-1, 5), per_key[:, :5], "amax")
    return BoundTables(centre, mass, bands, order, starts, maxima, float(per_key[:, 5].max()))


def extended_keys(
    x: torch.Tensor, mass: torch.Tensor, tables: BoundTables, out: torch.Tensor
) -> torch.Tensor:
    """``[K, h1, h2, h3, 1, 0…]`` of keys ``x (c, D)`` with ``mass (c, 3)`` into
    ``out (>= c, n)`` float32; returns ``out[:c]``."""
    c, d = x.shape
    centre_and_round(x, tables.centre, out)
    out[:c, d : d + 3] = mass
    out[:c, d + 3] = 1.0
    out[:c, d + 4 :] = 0.0
    return out[:c]


def extended_queries(q: torch.Tensor, tables: BoundTables) -> torch.Tensor:
    """``[Q, 1, 1, 1, β (set per band), 0…]`` of queries ``q (M, D)``: ``(M, n)`` float32."""
    m, d = q.shape
    out = torch.zeros(m, padded_width(d))
    centre_and_round(q, tables.centre, out)
    out[:, d : d + 3] = 1.0
    return out


def band_bounds(q: torch.Tensor, tables: BoundTables) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B⁰ (M, bands), β (M, bands))``: (2) without its ``β`` term, and ``β``, the
    bf16 value ``>= B⁰ / (1 − γ_n)`` added in the matmul, for queries ``q (M, D)``."""
    m, d = q.shape
    n = padded_width(d)
    q64 = q.to(torch.float64)
    rounded = centre_and_round(q, tables.centre, torch.empty(m, d)).to(torch.float64)
    e_q = ((q64 - tables.centre.to(torch.float64)) - rounded).norm(dim=1, keepdim=True)
    q_norm = rounded.norm(dim=1, keepdim=True)
    a, e, k, h, p = tables.maxima.T[:, None, :]  # each (1, bands)
    base = (
        e_q * a
        + q_norm * e
        + p
        + gamma(n) * (q_norm * k + h)
        + n * SUBNORMAL * (1 + q_norm + k + h)
    ) * SAFETY
    return base, bf16_round_up(base / (1 - gamma(n)))


def oracle_error(q: torch.Tensor, tables: BoundTables) -> torch.Tensor:
    """``G (M,)`` float64: the most the float32 oracle's ``fl(q·x)`` is off ``q·x``."""
    return gamma(q.shape[1]) * q.to(torch.float64).norm(dim=1) * tables.norm * SAFETY


def certified(
    upper: torch.Tensor,
    ids: torch.Tensor,
    beta: torch.Tensor,
    oracle: torch.Tensor,
    tables: BoundTables,
    k: int,
) -> torch.Tensor:
    """(3) per query: ``(M,)`` bool, from the candidates' ``u (M, kc)`` (best first) and
    ids, the bands' ``β (M, bands)`` and ``G (M,)``."""
    lower = upper.to(torch.float64) - 2 * beta.to(torch.float64).gather(1, tables.bands[ids])
    kth = lower.topk(k, dim=1).values[:, -1]
    return upper[:, -1].to(torch.float64) < kth - 2 * oracle
