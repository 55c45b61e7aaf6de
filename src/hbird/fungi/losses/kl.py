"""KL divergence to the uniform distribution (FUNGI, Table 17: temperature 15, head 768).

One non-augmented view: the input itself (by default the central 224 × 224 of the image
resized to 256 × 256, as FUNGI's code; :mod:`hbird.fungi.views`). The L2-normalised
embedding goes through a random linear head; the loss is ``KL(U ‖ softmax(h(z) / τ))`` with ``U`` uniform over the ``K`` head outputs:
``Σ_k (1/K) (log(1/K) − log p_k) = −log K − mean_k log p_k``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from hbird.fungi.heads import RandomHead
from hbird.fungi.losses.base import LOSSES, GradientLoss
from hbird.fungi.views import ViewGroup, Views


@LOSSES.register("kl")
class KLLoss(GradientLoss):
    """KL divergence between the uniform distribution and the head's softmax.

    Args:
        backbone: the frozen model. seed: the extractor seed.
        temperature: τ dividing the head outputs (paper: 15).
        head_dim: ``K``, width of the random head (paper: 768).
    """

    name = "kl"
    input_group = 0

    def __init__(
        self, backbone: Any, seed: int, temperature: float = 15.0, head_dim: int = 768
    ) -> None:
        super().__init__(backbone, seed)
        if temperature <= 0:
            raise ValueError(f"kl: temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.head = RandomHead(self.embed_dim, head_dim, seed, "kl")
        self.input_view = backbone.input_view
        self.settings = {"temperature": temperature, "head_dim": head_dim}

    def make_views(self, batch: Views) -> list[ViewGroup]:
        return [ViewGroup(self.input_view(batch), 1)]

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """``[(B, 1, D)]`` → ``(B,)``."""
        z = F.normalize(embeddings[0][:, 0], dim=-1)
        log_p = F.log_softmax(self.head(z) / self.temperature, dim=-1)  # (B, K)
        return -(math.log(log_p.shape[-1]) + log_p.mean(dim=-1))
