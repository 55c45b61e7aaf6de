"""Random linear heads: the projection heads of the self-supervised losses, never trained."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hbird.io.seeds import make_generator


class RandomHead(nn.Module):
    """``y = x Wᵀ + b`` with ``W (out, in)``, ``b (out,)`` drawn from a seed.

    Entries are uniform in ``±1/sqrt(in_dim)`` (the scale of ``nn.Linear``'s default
    initialisation), generated in float32 on the CPU so a seed gives the same head on
    every device. The parameters are buffers: they are saved with the extractor and
    never receive gradients.

    Args:
        in_dim: width of the embeddings fed to the head.
        out_dim: width of its output.
        seed: the extractor seed; ``key`` separates heads built from the same seed.
    """

    def __init__(self, in_dim: int, out_dim: int, seed: int, key: str) -> None:
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"head {key}: dimensions must be >= 1, got {in_dim} -> {out_dim}")
        gen = make_generator(seed, "head", key)
        bound = 1.0 / math.sqrt(in_dim)
        weight = (torch.rand(out_dim, in_dim, generator=gen) * 2.0 - 1.0) * bound
        bias = (torch.rand(out_dim, generator=gen) * 2.0 - 1.0) * bound
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_dim)`` → ``(..., out_dim)`` in ``x``'s dtype."""
        return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))
