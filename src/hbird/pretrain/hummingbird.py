"""Hummingbird contextual pretraining (Balazevic et al., NeurIPS 2023, §3.2–3.3).

Per view, the online network encodes patch features ``q_i``; each one cross-attends over
a memory ``M_p`` of spatially averaged keys from the *target* network (previous batches,
gathered across processes) whose values come from a value head ``φ`` (2-layer MLP with
batch norm). The contextualised feature is

    c_i = ψ((1 − λ) · q_i / ‖q_i‖ + λ · v̂_i / ‖v̂_i‖),   v̂_i = Σ_j softmax_j(q̂_i · k̂_j / τ_m) φ(k_j)

with λ = 0.2. QKV attention pooling (logits ``a``, values ``ω``) turns the ``c_i`` into one
vector per view, which goes through a projector ``p`` and, online only, a predictor
``q``. The target (an EMA of the online network, decay 0.99) encodes the other view
without memory. The loss is eq. 4: InfoNCE between the online prediction of one view and
the target projections of the other view of every image in the global batch, both
L2-normalised and rescaled by ``1/√τ`` (τ = 0.1), symmetrised over the two views.

Choices where the paper leaves room (all options): ``ψ`` is linear; the memory attention
uses cosine similarity over temperature ``memory_temperature``; the memory receives one
key per image, the mean of both views' spatially averaged target features.
``contextualize=False`` and ``pooling="mean"``/``"cls"`` rerun Table 5's ablations; with
CLS pooling the class token is contextualised like a patch and pooled alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hbird.pretrain.augment import MultiView, byol_views
from hbird.pretrain.backbone import Backbone, BackboneOutput
from hbird.pretrain.distributed import full_precision, gather, rank
from hbird.pretrain.ema import ema_update, make_target
from hbird.pretrain.heads import AttentionPooling, apply_to_tokens, mlp
from hbird.pretrain.memory import FeatureQueue
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective

POOLINGS = ("attention", "mean", "cls")

LabelledMemory = tuple[torch.Tensor, torch.Tensor]
"""A snapshot of ``M_p``: ``(keys (M, D), labels (M,))``, labels ``-1`` where unknown."""


def contextualize(
    queries: torch.Tensor,
    memory_keys: torch.Tensor,
    memory_values: torch.Tensor,
    mix: float,
    temperature: float,
) -> torch.Tensor:
    """Mix each query with what it retrieves from the memory (before ``ψ``).

    Args:
        queries: ``(B, N, D)`` online features.
        memory_keys: ``(M, D)`` keys (compared by cosine similarity).
        memory_values: ``(M, D)`` values ``φ(k_j)``.
        mix: λ, the weight of the retrieved value.
        temperature: softmax temperature of the memory attention.

    Returns:
        ``(B, N, D)``: ``(1 − λ) q̂ + λ v̂ / ‖v̂‖``.
    """
    q = F.normalize(queries, dim=-1)
    k = F.normalize(memory_keys, dim=-1)
    b, n, d = q.shape
    # one fused attention over all B·N queries: softmax_j(q̂ · k̂_j / τ) · values
    retrieved = F.scaled_dot_product_attention(
        q.reshape(1, 1, b * n, d),
        k.reshape(1, 1, -1, d),
        memory_values.reshape(1, 1, k.shape[0], -1),
        scale=1.0 / temperature,
    ).reshape(b, n, -1)
    return (1.0 - mix) * q + mix * F.normalize(retrieved, dim=-1)


def contrastive_loss(
    predictions: torch.Tensor, targets: torch.Tensor, temperature: float, offset: int = 0
) -> torch.Tensor:
    """Hummingbird eq. 4 for one direction.

    Args:
        predictions: ``(B, P)`` online predictions of this process's images.
        targets: ``(B_global, P)`` target projections of the other view of every image in
            the global batch; row ``offset + b`` belongs to the same image as prediction ``b``.
        temperature: τ; both sides are normalised and scaled by ``1/√τ``.

    Returns:
        Mean over ``b`` of ``−log softmax_j(p̂_b · t̂_j)[offset + b]``.
    """
    scale = 1.0 / math.sqrt(temperature)
    p = F.normalize(predictions, dim=-1) * scale
    t = F.normalize(targets, dim=-1) * scale
    logits = p @ t.T  # (B, B_global)
    positives = torch.arange(p.shape[0], device=p.device) + offset
    return F.cross_entropy(full_precision(logits), positives)


@dataclass(frozen=True)
class HummingbirdConfig:
    """Options of :class:`Hummingbird` (defaults follow the paper where it says).

    Attributes:
        contextualize: use the memory (False: ``c = ψ(q̂)``, Table 5's ablation).
        pooling: ``attention`` (QKV pooling), ``mean`` or ``cls``.
        memory_size: entries in ``M_p``. The memory attention costs about
            ``2 · memory_size · D`` multiply-adds per patch token (forward), next to the backbone's
            own per-token cost, so the step-time overhead grows with it: on ViT-S/16
            (batch 32, CPU) 4096 → +14%, 8192 → +27%, 16384 → +57%; wider backbones pay
            relatively less (``benchmarks/pretrain.py steptime``).
        memory_temperature: softmax temperature of the memory attention.
        mix: λ.
        value_hidden: hidden width of the value head ``φ``.
        proj_hidden, proj_dim: projector and predictor MLP widths.
        temperature: τ of eq. 4.
        ema_decay: decay of the target network.
        seed: seeds the random initial memory.
    """

    contextualize: bool = True
    pooling: str = "attention"
    memory_size: int = 4096
    memory_temperature: float = 0.1
    mix: float = 0.2
    value_hidden: int = 2048
    proj_hidden: int = 4096
    proj_dim: int = 256
    temperature: float = 0.1
    ema_decay: float = 0.99
    seed: int = 0

    def validate(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if not 0.0 <= self.mix <= 1.0:
            raise ValueError(f"mix (λ) must be in [0, 1], got {self.mix}")
        for name in ("temperature", "memory_temperature"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")


class Branch(nn.Module):
    """Backbone → ψ → pooling → projector: the part shared by online and target."""

    def __init__(self, backbone: Backbone, config: HummingbirdConfig) -> None:
        super().__init__()
        d = backbone.embed_dim
        self.backbone = backbone
        self.psi = nn.Linear(d, d)
        self.pool = AttentionPooling(d) if config.pooling == "attention" else None
        self.projector = mlp([d, config.proj_hidden, config.proj_dim], batch_norm=True)
        self.pooling = config.pooling

    def queries(self, out: BackboneOutput) -> torch.Tensor:
        """``(B, N, D)`` features to contextualise (CLS first when pooling by CLS)."""
        if self.pooling == "cls":
            return torch.cat([out.cls.unsqueeze(1), out.tokens], dim=1)
        return out.tokens

    def pooled(self, mixed: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` pre-ψ features → ``(B, D)``."""
        c = apply_to_tokens(self.psi, mixed)
        if self.pooling == "attention":
            return self.pool(c)
        if self.pooling == "mean":
            return c.mean(dim=1)
        return c[:, 0]


@OBJECTIVES.register("hummingbird")
class Hummingbird(Objective):
    """Contextual pretraining with attention pooling and an EMA-target contrastive loss."""

    name = "hummingbird"
    Config = HummingbirdConfig

    def __init__(self, backbone: Backbone, config: HummingbirdConfig) -> None:
        super().__init__(config)
        config.validate()
        d = backbone.embed_dim
        self.online = Branch(backbone, config)
        self.predictor = mlp(
            [config.proj_dim, config.proj_hidden, config.proj_dim], batch_norm=True
        )
        self.target = make_target(self.online)
        self.value_head = (
            mlp([d, config.value_hidden, d], batch_norm=True) if config.contextualize else None
        )
        self.memory = (
            FeatureQueue(config.memory_size, d, seed=config.seed) if self.uses_memory else None
        )

    @property
    def backbone(self) -> Backbone:
        return self.online.backbone

    @property
    def uses_memory(self) -> bool:
        """Whether ``M_p`` is kept (for contextualisation, or labels in Hummingbird++)."""
        return self.config.contextualize

    def views(self, crop_size: int, min_scale: float | None = None) -> MultiView:
        return byol_views(crop_size, min_scale)

    def mixed_queries(
        self, out: BackboneOutput, memory: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """``(B, N, D)`` online features mixed with what they retrieve from ``memory``
        (``(keys (M, D), values φ(keys) (M, D))``), or just normalised without it."""
        q = self.online.queries(out)
        if memory is None:
            return F.normalize(q, dim=-1)
        keys, values = memory
        return contextualize(q, keys, values, self.config.mix, self.config.memory_temperature)

    def online_pooled(
        self, views: list[torch.Tensor], memory_keys: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """``(B, D)`` pooled online representation per view."""
        memory = None
        if self.config.contextualize:
            memory = (memory_keys, self.value_head(memory_keys))  # φ once for both views
        return [
            self.online.pooled(self.mixed_queries(self.online.backbone(v), memory)) for v in views
        ]

    @torch.no_grad()
    def target_outputs(self, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Target projections ``(B, P)`` per view and memory keys ``(B, D)`` (view mean)."""
        projections, keys = [], []
        for v in views:
            out = self.target.backbone(v)
            mixed = F.normalize(self.target.queries(out), dim=-1)
            projections.append(self.target.projector(self.target.pooled(mixed)))
            keys.append(out.patches.mean(dim=(1, 2)))
        return projections, torch.stack(keys).mean(dim=0)

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        views = batch.views[:2]
        # A snapshot: the memory is updated in place below, after autograd saved it.
        memory = (
            None if self.memory is None else (self.memory.keys.clone(), self.memory.labels.clone())
        )
        pooled = self.online_pooled(views, None if memory is None else memory[0])
        predictions = [self.predictor(self.online.projector(y)) for y in pooled]
        targets, keys = self.target_outputs(views)
        targets = [gather(t) for t in targets]
        offset = rank() * batch.size
        tau = self.config.temperature
        contrastive = 0.5 * (
            contrastive_loss(predictions[0], targets[1], tau, offset)
            + contrastive_loss(predictions[1], targets[0], tau, offset)
        )
        losses = {"contrastive": contrastive}
        losses.update(self.extra_losses(batch, pooled, memory))
        losses["loss"] = sum(losses.values())
        if self.memory is not None:
            self.memory.push(keys, batch.labels)
        return losses

    def extra_losses(
        self, batch: Batch, pooled: list[torch.Tensor], memory: LabelledMemory | None
    ) -> dict[str, torch.Tensor]:
        """Hook for Hummingbird++: ``memory`` is ``M_p`` as it was before this batch."""
        return {}

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        ema_update(self.target, self.online, self.config.ema_decay)
