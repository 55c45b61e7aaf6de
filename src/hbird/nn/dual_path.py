"""MaX-DeepLab's dual-path transformer block (Wang 2021, thesis §4.3.3, eq. 4.13-4.14).

A 2D pixel path ``x^p (B, H, W, C)`` (channels last, as :mod:`hbird.nn.axial`) and a 1D
global memory ``x^m (B, N, M)`` (one slot per predicted mask) talk through four kinds
of attention:

* **P2P** pixel-to-pixel: an axial-attention bottleneck (:class:`~hbird.nn.axial.AxialBlock`)
  or, as the thesis' ablation baseline, a 3×3 convolutional bottleneck;
* **P2M** pixel-to-memory feedback (eq. 4.13): ``y^p_a = Σ_n softmax_n(q^p_a·k^m_n) v^m_n``;
* **M2P + M2M** memory-to-pixel and memory-to-memory in one softmax over the
  concatenation ``[pixels; memory]`` (eq. 4.14):
  ``y^m_b = Σ_{n ≤ HW+N} softmax_n(q^m_b·k^{pm}_n) v^{pm}_n``, ``k^{pm} = [k^p; k^m]``;
* an FFN on the memory.

All attention is multi-head (8 heads, thesis §C.6); ``q, k, v`` of both paths are 1×1
projections followed by BN (BN in every attention layer, as Axial-DeepLab). Both
attentions read the block's inputs (after P2P), so they run in parallel; each output
is projected back, batch-normalised and added to its path (residual).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hbird.nn.axial import AxialBlock, ChannelsLastBatchNorm

PIXEL_BLOCKS = ("axial", "conv")


def pixel_to_memory(q_p: torch.Tensor, k_m: torch.Tensor, v_m: torch.Tensor) -> torch.Tensor:
    """Eq. 4.13, per head: ``q_p (B, P, G, d)``, ``k_m (B, N, G, d)``, ``v_m (B, N, G, e)``
    → ``(B, P, G, e)``, the softmax over the ``N`` memory slots."""
    attention = torch.einsum("bpgd,bngd->bgpn", q_p, k_m).softmax(dim=-1)
    return torch.einsum("bgpn,bnge->bpge", attention, v_m)


def memory_to_all(
    q_m: torch.Tensor,
    k_p: torch.Tensor,
    v_p: torch.Tensor,
    k_m: torch.Tensor,
    v_m: torch.Tensor,
) -> torch.Tensor:
    """Eq. 4.14, per head: memory queries ``q_m (B, N, G, d)`` over the keys and values of
    the pixels ``(B, P, G, ·)`` and of the memory ``(B, N, G, ·)``, one softmax over all
    ``P + N`` of them → ``(B, N, G, e)``."""
    keys = torch.cat([k_p, k_m], dim=1)
    values = torch.cat([v_p, v_m], dim=1)
    attention = torch.einsum("bngd,bkgd->bgnk", q_m, keys).softmax(dim=-1)
    return torch.einsum("bgnk,bkge->bnge", attention, values)


class ConvBottleneck(nn.Module):
    """The convolutional P2P stand-in: 1×1 down, BN, ReLU, 3×3, BN, ReLU, 1×1 up, BN,
    residual, ReLU, on a channels-last ``(B, H, W, C)`` map."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.conv_down = nn.Linear(dim, width, bias=False)
        self.bn1 = ChannelsLastBatchNorm(width)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv_up = nn.Linear(width, dim, bias=False)
        self.bn3 = ChannelsLastBatchNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv_down(x)))
        out = F.relu(self.bn2(self.conv(out.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        return F.relu(x + self.bn3(self.conv_up(out)))


class DualPathBlock(nn.Module):
    """One dual-path transformer block (see the module docstring).

    Args:
        pixel_dim: pixel-path channels ``C`` (in and out).
        memory_dim: memory channels ``M`` (in and out).
        width: attention channels (``q, k`` and ``v`` of every head together), also the
            P2P bottleneck width; a multiple of ``heads`` (and of ``2·heads`` for axial).
        heads: attention heads (8 in the thesis).
        pixel_block: the P2P layer: ``"axial"`` (an axial bottleneck of span ``span``),
            ``"conv"``, or a module mapping ``(B, H, W, C)`` to itself (e.g. a
            pretrained backbone block the dual-path block replaces).
        ffn_dim: hidden channels of the memory FFN (default ``4·memory_dim``).
    """

    def __init__(
        self,
        pixel_dim: int,
        memory_dim: int,
        width: int,
        heads: int = 8,
        pixel_block: str | nn.Module = "axial",
        span: int = 65,
        ffn_dim: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(pixel_block, str) and pixel_block not in PIXEL_BLOCKS:
            raise ValueError(f"pixel_block must be one of {PIXEL_BLOCKS}, got {pixel_block!r}")
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads = {heads}")
        self.heads, self.width = heads, width
        if pixel_block == "axial":
            pixel_block = AxialBlock(pixel_dim, width, pixel_dim, heads=heads, span=span)
        elif pixel_block == "conv":
            pixel_block = ConvBottleneck(pixel_dim, width)
        self.pixel_block = pixel_block
        self.pixel_qkv = nn.Linear(pixel_dim, 3 * width, bias=False)
        self.pixel_bn_qkv = ChannelsLastBatchNorm(3 * width)
        self.memory_qkv = nn.Linear(memory_dim, 3 * width, bias=False)
        self.memory_bn_qkv = ChannelsLastBatchNorm(3 * width)
        self.pixel_out = nn.Linear(width, pixel_dim, bias=False)
        self.pixel_bn_out = ChannelsLastBatchNorm(pixel_dim)
        self.memory_out = nn.Linear(width, memory_dim, bias=False)
        self.memory_bn_out = ChannelsLastBatchNorm(memory_dim)
        hidden = ffn_dim or 4 * memory_dim
        self.ffn = nn.Sequential(
            nn.Linear(memory_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, memory_dim, bias=False),
            ChannelsLastBatchNorm(memory_dim),
        )

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, L, 3·width)`` channels ``[q | k | v]`` → ``q, k, v`` ``(B, L, G, width / G)``."""
        return tuple(t.reshape(*x.shape[:2], self.heads, -1) for t in x.chunk(3, dim=-1))

    def forward(
        self, pixels: torch.Tensor, memory: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``pixels (B, H, W, C)``, ``memory (B, N, M)`` → the updated pair, same shapes."""
        pixels = self.pixel_block(pixels)
        b, h, w, _ = pixels.shape
        q_p, k_p, v_p = self._heads(self.pixel_bn_qkv(self.pixel_qkv(pixels.reshape(b, h * w, -1))))
        q_m, k_m, v_m = self._heads(self.memory_bn_qkv(self.memory_qkv(memory)))
        y_p = pixel_to_memory(q_p, k_m, v_m).reshape(b, h, w, self.width)
        y_m = memory_to_all(q_m, k_p, v_p, k_m, v_m).reshape(b, -1, self.width)
        pixels = F.relu(pixels + self.pixel_bn_out(self.pixel_out(y_p)))
        memory = memory + self.memory_bn_out(self.memory_out(y_m))
        return pixels, memory + self.ffn(memory)
