"""Position-sensitive axial attention (Wang 2021, thesis §3.3, eq. 3.3-3.4) and its block.

Along one axis of a channels-last map ``x (B, H, W, C)``, for every position ``o``::

    y_o = Σ_{|p-o| < m} softmax_p(BN(q_oᵀk_p) + BN(q_oᵀr^q_{p-o}) + BN(k_pᵀr^k_{p-o}))
                        ⊗ (v_p ; r^v_{p-o})  →  BN(Σ a·v) + BN(Σ a·r^v)

per head (8 by default). ``q, k, v`` come from one 1×1 projection followed by BN (the
thesis puts BN in all attention layers, §3.4.1); ``q, k`` have ``d_q`` channels per head
and ``v`` has ``d_out = 2·d_q``. The relative embeddings ``r^q, r^k ∈ R^{d_q}`` and
``r^v ∈ R^{d_out}`` are learned per offset and shared by the heads, in tables of
``2m - 1`` offsets indexed by ``(p - o) + m - 1``. Offsets with ``|p - o| ≥ m`` are
masked; an axis shorter than ``m`` is attended globally. Any axis length works: the
embeddings of the actual length are gathered from the table (:func:`relative_index`).

BN layout (the same as csrhddlam/axial-deeplab, so its checkpoints convert by reindexing):
``bn_similarity`` has ``3·heads`` channels, term-major ``[qk heads, qr heads, kr heads]``;
``bn_output`` has ``2·out_dim`` channels ``[Σ a·v channels, Σ a·r^v channels]``.

Tensors are channels-last throughout (``(B, H, W, C)``): 1×1 convolutions are
``nn.Linear`` over the channels, which is also what FUNGI's per-token gradients tap.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

SIMILARITY_TERMS = ("qk", "qr", "kr")
"""The logits of eq. 3.3: content ``q_oᵀk_p``, query-position ``q_oᵀr^q``, key-position ``k_pᵀr^k``."""
OUTPUT_TERMS = ("v", "rv")
"""The pooled values of eq. 3.3: content ``v_p`` and value-position ``r^v_{p-o}``."""
ALL_TERMS = SIMILARITY_TERMS + OUTPUT_TERMS


class ChannelsLastBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the last axis of ``(..., C)`` (the statistics of ``BatchNorm2d`` on
    the same map in NCHW; same state-dict keys)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def batch_norm_slice(norm: nn.modules.batchnorm._BatchNorm, x, start: int, stop: int):
    """``norm`` applied to ``x`` (channels on axis 1) as channels ``start:stop`` of its input:
    the same result (and running-statistics update) as normalising the concatenation, without
    building it.

    A norm with its own ``forward_slice(x, start, stop)`` computes the slice itself: the
    global-batch norms DDP pretraining swaps in do (:mod:`hbird.pretrain.backbone`).
    """
    own = getattr(norm, "forward_slice", None)
    if own is not None:
        return own(x, start, stop)
    return local_batch_norm_slice(norm, x, start, stop)


def local_batch_norm_slice(norm: nn.modules.batchnorm._BatchNorm, x, start: int, stop: int):
    """:func:`batch_norm_slice` with this process's batch statistics (``F.batch_norm``)."""
    part = slice(start, stop)
    stats = norm.running_mean is not None and not norm.training
    return F.batch_norm(
        x,
        norm.running_mean[part] if norm.running_mean is not None else None,
        norm.running_var[part] if norm.running_var is not None else None,
        norm.weight[part] if norm.weight is not None else None,
        norm.bias[part] if norm.bias is not None else None,
        training=not stats,
        momentum=0.1 if norm.momentum is None else norm.momentum,
        eps=norm.eps,
    )


def relative_index(length: int, span: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Offset-table rows and the span mask of an axis of ``length`` positions.

    Returns:
        ``index (L, L)`` long, ``index[o, p] = clamp(p - o, -(m-1), m-1) + m - 1``, and
        ``outside (L, L)`` bool, true where ``|p - o| ≥ m`` (masked out of the softmax).
    """
    pos = torch.arange(length, device=device)
    offset = pos[None, :] - pos[:, None]  # [o, p] = p - o
    outside = offset.abs() >= span
    return offset.clamp(-(span - 1), span - 1) + (span - 1), outside


def avg_pool_channels_last(x: torch.Tensor, stride: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B, ⌈H/s⌉, ⌈W/s⌉, C)``: ``s × s`` average pooling (a partial
    window at an odd edge averages what it covers)."""
    if stride == 1:
        return x
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), stride, stride, ceil_mode=True)
    return pooled.permute(0, 2, 3, 1)


def _check_terms(terms: Iterable[str]) -> frozenset[str]:
    chosen = frozenset(terms)
    unknown = sorted(chosen - set(ALL_TERMS))
    if unknown or not chosen & set(OUTPUT_TERMS):
        raise ValueError(
            f"terms must be a subset of {ALL_TERMS} with at least one of {OUTPUT_TERMS}, "
            f"got {sorted(chosen)}"
        )
    return chosen


class AxialAttention(nn.Module):
    """Multi-head position-sensitive self-attention along one axis (eq. 3.4).

    Args:
        in_dim: input channels ``d_in``.
        out_dim: output channels (``heads · d_out``; ``d_q = d_out / 2`` per head).
        heads: attention heads ``N`` (8 in the thesis).
        span: ``m``; offsets ``|p - o| ≥ m`` are masked, shorter axes are global.
        axis: ``"height"`` or ``"width"`` of a ``(B, H, W, C)`` map.
        stride: average pooling (both axes) after the attention (thesis §3.3.2).
        terms: which terms of eq. 3.3 are used (all by default; subsets are for
            ablations and tests: e.g. ``("qk", "v")`` is content-only attention).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        heads: int = 8,
        span: int = 65,
        axis: str = "width",
        stride: int = 1,
        terms: Iterable[str] = ALL_TERMS,
    ) -> None:
        super().__init__()
        if axis not in ("height", "width"):
            raise ValueError(f"axis must be 'height' or 'width', got {axis!r}")
        if out_dim % (2 * heads):
            raise ValueError(f"out_dim {out_dim} must be a multiple of 2·heads = {2 * heads}")
        if span < 1 or stride < 1:
            raise ValueError(f"span and stride must be >= 1, got {span} and {stride}")
        self.in_dim, self.out_dim, self.heads = in_dim, out_dim, heads
        self.span, self.axis, self.stride = span, axis, stride
        self.terms = _check_terms(terms)
        self.value_dim = out_dim // heads  # d_out per head
        self.query_dim = self.value_dim // 2  # d_q per head
        # per head [q (d_q), k (d_q), v (d_out)], head-major
        self.qkv = nn.Linear(in_dim, 2 * out_dim, bias=False)
        self.bn_qkv = ChannelsLastBatchNorm(2 * out_dim)
        self.bn_similarity = nn.BatchNorm2d(3 * heads)
        self.bn_output = ChannelsLastBatchNorm(2 * out_dim)
        offsets = 2 * span - 1
        self.rel_q = nn.Parameter(torch.empty(offsets, self.query_dim))
        self.rel_k = nn.Parameter(torch.empty(offsets, self.query_dim))
        self.rel_v = nn.Parameter(torch.empty(offsets, self.value_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, 0.0, math.sqrt(1.0 / self.in_dim))
        for table in (self.rel_q, self.rel_k, self.rel_v):
            nn.init.normal_(table, 0.0, math.sqrt(1.0 / self.value_dim))

    def relative_embeddings(
        self, length: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``r^q, r^k (L, L, d_q)``, ``r^v (L, L, d_out)`` indexed ``[o, p]`` by ``p - o``,
        and the ``(L, L)`` span mask."""
        index, outside = relative_index(length, self.span, self.rel_q.device)
        return self.rel_q[index], self.rel_k[index], self.rel_v[index], outside

    def logits(self, q, k, rq, rk) -> torch.Tensor:
        """``q, k (N, L, G, d_q)`` → the sum of the chosen BN'd terms ``(N, G, L_o, L_p)``."""
        g = self.heads
        products = {
            "qk": lambda: torch.einsum("nogc,npgc->ngop", q, k),
            "qr": lambda: torch.einsum("nogc,opc->ngop", q, rq),
            "kr": lambda: torch.einsum("npgc,opc->ngop", k, rk),
        }
        total = None
        for i, term in enumerate(SIMILARITY_TERMS):
            if term in self.terms:
                part = batch_norm_slice(self.bn_similarity, products[term](), i * g, (i + 1) * g)
                total = part if total is None else total + part
        if total is None:  # no similarity term: uniform attention over the span
            n, length = q.shape[:2]
            total = q.new_zeros(n, g, length, length)
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in)`` → ``(B, ⌈H/s⌉, ⌈W/s⌉, C_out)``."""
        if self.axis == "height":
            x = x.transpose(1, 2)  # lines along H
        b, lines, length, _ = x.shape
        g, dq = self.heads, self.query_dim
        qkv = self.bn_qkv(self.qkv(x.reshape(b * lines, length, -1)))
        q, k, v = qkv.view(b * lines, length, g, -1).split([dq, dq, self.value_dim], dim=-1)
        rq, rk, rv, outside = self.relative_embeddings(length)
        logits = self.logits(q, k, rq, rk)
        if bool(outside.any()):
            logits = logits.masked_fill(outside, float("-inf"))
        attention = logits.softmax(dim=-1)  # (N, G, L_o, L_p)
        pooled = {
            "v": lambda: torch.einsum("ngop,npgc->nogc", attention, v),
            "rv": lambda: torch.einsum("ngop,opc->nogc", attention, rv),
        }
        y = None
        for i, term in enumerate(OUTPUT_TERMS):
            if term in self.terms:
                flat = pooled[term]().reshape(-1, self.out_dim)  # (N·L, C_out)
                part = batch_norm_slice(
                    self.bn_output, flat, i * self.out_dim, (i + 1) * self.out_dim
                )
                y = part if y is None else y + part
        y = y.view(b, lines, length, self.out_dim)
        if self.axis == "height":
            y = y.transpose(1, 2)
        return avg_pool_channels_last(y, self.stride)

    def extra_repr(self) -> str:
        return (
            f"{self.in_dim}, {self.out_dim}, heads={self.heads}, span={self.span}, "
            f"axis={self.axis}, stride={self.stride}"
        )


class AxialBlock(nn.Module):
    """The axial-attention bottleneck (thesis Fig. 3.2): 1×1 down, BN, ReLU, height
    attention, width attention (strided by pooling), ReLU, 1×1 up, BN, residual, ReLU.

    Args:
        in_dim: input channels.
        width: bottleneck channels (attention in and out).
        out_dim: output channels (``2 · width`` in Axial-ResNets).
        stride: pooling after the width attention; the shortcut subsamples to match.
        heads, span: of both attention layers.

    The 1×1 projections run on ``(B, h·w, C)`` tokens, so ``conv_up`` of the last block
    is a FUNGI gradient layer whose tokens are the output grid's cells.
    """

    def __init__(
        self,
        in_dim: int,
        width: int,
        out_dim: int,
        stride: int = 1,
        heads: int = 8,
        span: int = 65,
    ) -> None:
        super().__init__()
        self.stride = stride
        self.conv_down = nn.Linear(in_dim, width, bias=False)
        self.bn1 = ChannelsLastBatchNorm(width)
        self.height_block = AxialAttention(width, width, heads, span, axis="height")
        self.width_block = AxialAttention(width, width, heads, span, axis="width", stride=stride)
        self.conv_up = nn.Linear(width, out_dim, bias=False)
        self.bn2 = ChannelsLastBatchNorm(out_dim)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_dim != out_dim:
            self.shortcut = nn.Sequential(
                nn.Linear(in_dim, out_dim, bias=False), ChannelsLastBatchNorm(out_dim)
            )

    @staticmethod
    def _tokens(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """A channel-wise layer applied to ``(B, H, W, C)`` as ``(B, H·W, C)`` tokens."""
        b, h, w, _ = x.shape
        return layer(x.reshape(b, h * w, -1)).reshape(b, h, w, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C_in)`` → ``(B, ⌈H/s⌉, ⌈W/s⌉, C_out)``."""
        out = F.relu(self.bn1(self._tokens(self.conv_down, x)))
        out = F.relu(self.width_block(self.height_block(out)))
        out = self.bn2(self._tokens(self.conv_up, out))
        identity = x
        if self.shortcut is not None:
            identity = self._tokens(self.shortcut, x[:, :: self.stride, :: self.stride])
        return F.relu(out + identity)
