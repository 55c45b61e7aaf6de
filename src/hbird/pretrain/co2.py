"""CO2: consistent contrast (Wei et al., ICLR 2021; Wang's JHU thesis, 2021, ch. 5).

Instance discrimination with a momentum encoder and a queue of negatives (MoCo v2), plus
a consistency term: the query's similarity distribution over the negatives should agree
with the positive key's,

    P(i) = softmax_i(q · n_i / τ_con),  Q(i) = softmax_i(p · n_i / τ_con),
    L_con = ½ KL(P ‖ Q) + ½ KL(Q ‖ P),

    L = L_ins + α · L_con,  L_ins = −log e^{q·p/τ_ins} / (e^{q·p/τ_ins} + Σ_i e^{q·n_i/τ_ins}).

The query comes from the online network's class token through a 2-layer MLP head, the
positive key from the momentum encoder on the other view; both views serve as query in
turn, and both views' keys enter the queue (gathered across processes).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hbird.pretrain.augment import MultiView, mocov2_views
from hbird.pretrain.backbone import Backbone
from hbird.pretrain.distributed import full_precision
from hbird.pretrain.ema import ema_update, make_target
from hbird.pretrain.heads import mlp
from hbird.pretrain.memory import FeatureQueue
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective


def instance_loss(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """MoCo's InfoNCE: ``(B, P)`` queries and positive keys, ``(K, P)`` negatives; unit vectors."""
    pos = (queries * positives).sum(-1, keepdim=True)  # (B, 1)
    neg = queries @ negatives.T  # (B, K)
    logits = full_precision(torch.cat([pos, neg], dim=1)) / temperature
    return F.cross_entropy(
        logits, torch.zeros(len(queries), dtype=torch.long, device=queries.device)
    )


def consistency_loss(
    queries: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Symmetric KL between the query's and the positive's distributions over the negatives.

    Shapes as in :func:`instance_loss`; returns the mean over the batch.
    """
    log_p = F.log_softmax(full_precision(queries @ negatives.T) / temperature, dim=-1)
    log_q = F.log_softmax(full_precision(positives @ negatives.T) / temperature, dim=-1)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum(-1)
    kl_qp = (log_q.exp() * (log_q - log_p)).sum(-1)
    return (0.5 * (kl_pq + kl_qp)).mean()


@dataclass(frozen=True)
class CO2Config:
    """Options of :class:`CO2`.

    Attributes:
        proj_hidden, proj_dim: the 2-layer MLP head (MoCo v2).
        queue_size: number of negatives.
        instance_temperature: τ_ins; consistency_temperature: τ_con.
        consistency_weight: α.
        ema_decay: momentum of the key encoder.
        seed: seeds the random initial queue.
    """

    proj_hidden: int = 2048
    proj_dim: int = 128
    queue_size: int = 65536
    instance_temperature: float = 0.2
    consistency_temperature: float = 0.04
    consistency_weight: float = 10.0
    ema_decay: float = 0.999
    seed: int = 0


class QueryNet(nn.Module):
    """Backbone → class token → MLP head → unit vector."""

    def __init__(self, backbone: Backbone, config: CO2Config) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = mlp([backbone.embed_dim, config.proj_hidden, config.proj_dim])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.backbone(images).cls), dim=-1)


@OBJECTIVES.register("co2")
class CO2(Objective):
    """MoCo-style instance discrimination plus the CO2 consistency term."""

    name = "co2"
    Config = CO2Config

    def __init__(self, backbone: Backbone, config: CO2Config) -> None:
        super().__init__(config)
        self.online = QueryNet(backbone, config)
        self.momentum = make_target(self.online)
        self.queue = FeatureQueue(config.queue_size, config.proj_dim, seed=config.seed)

    @property
    def backbone(self) -> Backbone:
        return self.online.backbone

    def views(self, crop_size: int, min_scale: float | None = None) -> MultiView:
        return mocov2_views(crop_size, min_scale)

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        cfg = self.config
        views = batch.views[:2]
        queries = [self.online(v) for v in views]
        with torch.no_grad():
            keys = [self.momentum(v) for v in views]
        negatives = self.queue.keys.clone()
        ins = 0.5 * (
            instance_loss(queries[0], keys[1], negatives, cfg.instance_temperature)
            + instance_loss(queries[1], keys[0], negatives, cfg.instance_temperature)
        )
        con = 0.5 * (
            consistency_loss(queries[0], keys[1], negatives, cfg.consistency_temperature)
            + consistency_loss(queries[1], keys[0], negatives, cfg.consistency_temperature)
        )
        self.queue.push(torch.cat(keys))
        weighted = cfg.consistency_weight * con
        return {"instance": ins, "consistency": weighted, "loss": ins + weighted}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.momentum, self.online, self.config.ema_decay)
