"""Local-to-global dense contrastive pretraining (Rabarisoa et al., T4V @ CVPR 2023, §3.2).

Both views go through the same network and a 3-layer GELU MLP head (shared by the
global and the patch tokens). The global representation (class token) of one view is
contrasted with every patch of the other view: each patch of the same image is a
positive; the patches of every other image in the (global) batch are the negatives, so
their number grows with the number of local features rather than with the batch alone.
Features are L2-normalised and compared with temperature τ = 0.1; the loss is
symmetrised over the two views. There is no target network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hbird.pretrain.augment import MultiView, byol_views
from hbird.pretrain.backbone import Backbone
from hbird.pretrain.distributed import full_precision, gather_with_grad, rank
from hbird.pretrain.heads import apply_to_tokens, mlp
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective


def local_global_loss(
    global_features: torch.Tensor,
    patch_features: torch.Tensor,
    temperature: float,
    offset: int = 0,
) -> torch.Tensor:
    """InfoNCE of each (global, own patch) pair against the patches of the other images.

    Args:
        global_features: ``(B, P)`` global representations of this process's images.
        patch_features: ``(B_global, N, P)`` patch features of the other view of every
            image in the global batch; image ``offset + b`` is the positive set of ``b``.
        temperature: τ.

    Returns:
        Mean over ``b`` and patches ``n`` of
        ``−log e^{s(b, b n)} / (e^{s(b, b n)} + Σ_{j ≠ b, m} e^{s(b, j m)})``,
        ``s(b, j m) = ĝ_b · p̂_{j m} / τ``.
    """
    g = F.normalize(global_features, dim=-1)
    p = F.normalize(patch_features, dim=-1)
    b, n = g.shape[0], p.shape[1]
    sims = full_precision(torch.einsum("bd,jmd->bjm", g, p)) / temperature  # (B, B_global, N)
    own = torch.arange(b, device=g.device) + offset
    positives = sims[torch.arange(b, device=g.device), own]  # (B, N)
    is_own = F.one_hot(own, sims.shape[1]).bool().unsqueeze(-1)  # (B, B_global, 1)
    negatives = sims.masked_fill(is_own, float("-inf")).flatten(1).logsumexp(dim=1)  # (B,)
    denominators = torch.logaddexp(positives, negatives.unsqueeze(1).expand(b, n))
    return (denominators - positives).mean()


@dataclass(frozen=True)
class LocalGlobalConfig:
    """Options of :class:`LocalGlobal`.

    Attributes:
        head_hidden, head_dim: widths of the 3-layer GELU MLP head.
        temperature: τ.
    """

    head_hidden: int = 2048
    head_dim: int = 256
    temperature: float = 0.1


@OBJECTIVES.register("local_global")
class LocalGlobal(Objective):
    """Global-to-patch InfoNCE across views, negatives from the whole batch."""

    name = "local_global"
    Config = LocalGlobalConfig

    def __init__(self, backbone: Backbone, config: LocalGlobalConfig) -> None:
        super().__init__(config)
        self.net = backbone
        d = backbone.embed_dim
        self.head = mlp([d, config.head_hidden, config.head_hidden, config.head_dim], "gelu")

    @property
    def backbone(self) -> Backbone:
        return self.net

    def views(self, crop_size: int, min_scale: float | None = None) -> MultiView:
        return byol_views(crop_size, min_scale)

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        outs = [self.net(v) for v in batch.views[:2]]
        globals_ = [self.head(o.cls) for o in outs]  # (B, P)
        patches = [gather_with_grad(apply_to_tokens(self.head, o.tokens)) for o in outs]
        offset = rank() * batch.size
        tau = self.config.temperature
        loss = 0.5 * (
            local_global_loss(globals_[0], patches[1], tau, offset)
            + local_global_loss(globals_[1], patches[0], tau, offset)
        )
        return {"local_global": loss, "loss": loss}
