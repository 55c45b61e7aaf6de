"""DenseCLIP / MaskCLIP dense embeddings of a CLIP ResNet (issue 11, step 5).

The CLIP ResNet pools its last feature map with one attention layer whose query is the
map's mean. MaskCLIP skips the query·key part and the positional embedding and applies
only the value projection, then the output projection, at every location of ``layer4``'s
map, which gives an embedding per location in the joint space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention_pool_dense(attnpool: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """``features (B, C, h, w)`` from ``layer4`` → ``(B, h, w, E)``:
    ``c_proj(v_proj(x))`` at every location (no query·key, no positional embedding)."""
    x = features.permute(0, 2, 3, 1)  # (B, h, w, C)
    x = F.linear(x, attnpool.v_proj.weight, attnpool.v_proj.bias)
    return F.linear(x, attnpool.c_proj.weight, attnpool.c_proj.bias)


def resnet_dense(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ``ModifiedResNet`` on normalised ``x (B, 3, H, W)`` → ``(B, H/32, W/32, E)``."""
    x = x.to(visual.conv1.weight.dtype)
    x = visual.stem(x)
    for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
        x = layer(x)
    return attention_pool_dense(visual.attnpool, x)
