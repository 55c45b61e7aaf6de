"""The linear head: frozen, standardised patch features → logits or values, and its predictions."""

from __future__ import annotations

import torch
from torch import nn

from hbird.decode import DensePrediction, upsample
from hbird.labelspec import LabelSpec


class LinearHead(nn.Module):
    """``(..., D)`` patch features → ``(..., C)`` logits (segmentation) or values (regression).

    ``linear((x - feature_mean) / feature_std) · target_std + target_mean``; the statistics
    are buffers fixed from the prompt (target statistics are 0 / 1 for segmentation).
    """

    def __init__(
        self,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        out_dim: int,
        target_mean: torch.Tensor | None = None,
        target_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dim = feature_mean.shape[0]
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", feature_mean.to(torch.float32))
        self.register_buffer("feature_std", feature_std.to(torch.float32))
        self.register_buffer(
            "target_mean", torch.zeros(out_dim) if target_mean is None else target_mean.float()
        )
        self.register_buffer(
            "target_std", torch.ones(out_dim) if target_std is None else target_std.float()
        )

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Output in the standardised target space (what the loss sees)."""
        return self.linear((x.to(torch.float32) - self.feature_mean) / self.feature_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardised(x) * self.target_std + self.target_mean


def predict_linear(
    head: LinearHead, features: torch.Tensor, size: tuple[int, int], spec: LabelSpec
) -> DensePrediction:
    """``(h, w, D)`` query features → a prediction at the query's original ``size``.

    Segmentation: logits upsampled bilinearly, then argmax (confidence = the winning
    class's softmax probability). Regression: values upsampled bilinearly.
    """
    with torch.no_grad():
        patch_out = head(features)  # (h, w, C)
        up = upsample(patch_out, size)  # (C, H, W)
    if spec.is_classification:
        probs = torch.softmax(up, dim=0)
        confidence, labels = probs.max(dim=0)
        return DensePrediction(labels.to(torch.int64), confidence, patch_out)
    values = up[0] if up.shape[0] == 1 else up.permute(1, 2, 0).contiguous()
    return DensePrediction(values, torch.ones(size, dtype=torch.float32), patch_out)
