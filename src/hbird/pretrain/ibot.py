"""iBOT: masked image modelling by self-distillation with an online tokenizer.

(Zhou et al., ICLR 2022; as described in Wang's JHU thesis, 2021, ch. 6.)

A student ViT sees two global crops with blockwise-masked patches (mask token in their
place) plus optional local crops; an EMA teacher sees the unmasked global crops. One
DINO head is shared by class and patch tokens. Two self-distillation terms:

* CLS: cross-view, ``−Σ softmax((t_cls − c) / τ_t) · log softmax(s_cls / τ_s)`` over every
  (teacher global view, other student view) pair;
* MIM: same view, the same cross-entropy between teacher and student patch outputs at
  the masked positions, averaged per image over its masked patches.

Teacher outputs are centred with EMA centres (momentum 0.9, one for CLS, one for
patches); the teacher temperature warms up linearly from 0.04 to 0.07; the teacher's
momentum follows a cosine from 0.996 to 1. Each image's prediction ratio is 0 with
probability 0.5, else uniform in [0.1, 0.5]. The exported backbone is the teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hbird.errors import InputError
from hbird.pretrain.augment import MultiView, multicrop_views
from hbird.pretrain.backbone import Backbone
from hbird.pretrain.distributed import full_precision, mean_over_processes
from hbird.pretrain.ema import cosine_decay, ema_update, make_target
from hbird.pretrain.heads import DINOHead
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective


def blockwise_mask(
    grid: tuple[int, int],
    ratio: float,
    gen: torch.Generator,
    min_block: int = 4,
    aspect: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """A ``(h, w)`` bool mask of about ``ratio · h · w`` patches made of rectangles (BEiT).

    Rectangles of random area (at least ``min_block`` patches) and log-uniform aspect
    ratio are added until the target count is reached; a rectangle that would add
    nothing new is redrawn (at most 10 times per round).
    """
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    target = int(round(ratio * h * w))
    log_aspect = (math.log(aspect[0]), math.log(aspect[1]))
    while int(mask.sum()) < target:
        remaining = target - int(mask.sum())
        added = 0
        for _ in range(10):
            low = min(min_block, remaining)
            area = low + (remaining - low) * float(torch.rand((), generator=gen))
            a = math.exp(
                log_aspect[0]
                + (log_aspect[1] - log_aspect[0]) * float(torch.rand((), generator=gen))
            )
            bh = min(h, max(1, int(round(math.sqrt(area * a)))))
            bw = min(w, max(1, int(round(math.sqrt(area / a)))))
            top = int(torch.randint(0, h - bh + 1, (), generator=gen))
            left = int(torch.randint(0, w - bw + 1, (), generator=gen))
            block = mask[top : top + bh, left : left + bw]
            new = int((~block).sum())
            if 0 < new <= remaining:
                block.fill_(True)
                added = new
                break
        if added == 0:  # nothing fits exactly: mask single free patches
            free = (~mask).flatten().nonzero().squeeze(1)
            pick = free[torch.randperm(free.numel(), generator=gen)[:remaining]]
            mask.view(-1)[pick] = True
    return mask


class PredictionRatioMasker:
    """Draws one image's mask: ratio 0 with probability ``p_zero``, else U[low, high]."""

    def __init__(
        self, grid: tuple[int, int], p_zero: float = 0.5, ratio: tuple[float, float] = (0.1, 0.5)
    ):
        self.grid, self.p_zero, self.ratio = grid, p_zero, ratio

    def __call__(self, gen: torch.Generator) -> torch.Tensor:
        if float(torch.rand((), generator=gen)) < self.p_zero:
            return torch.zeros(self.grid, dtype=torch.bool)
        r = self.ratio[0] + (self.ratio[1] - self.ratio[0]) * float(torch.rand((), generator=gen))
        return blockwise_mask(self.grid, r, gen)


def distillation(
    teacher_probs: torch.Tensor, student_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``−Σ_k t_k log softmax(s / τ_s)_k`` over the last dim: ``(..., K)`` → ``(...)``."""
    return -(
        teacher_probs * F.log_softmax(full_precision(student_logits) / temperature, dim=-1)
    ).sum(-1)


def ibot_cls_loss(
    teacher_probs: list[torch.Tensor],
    student_logits: list[torch.Tensor],
    student_temperature: float,
) -> torch.Tensor:
    """Mean over (teacher view i, student view j ≠ i) pairs and images.

    Args:
        teacher_probs: ``(B, K)`` centred, sharpened teacher CLS distributions per global view.
        student_logits: ``(B, K)`` student CLS logits per view (globals first, then locals).
    """
    terms = [
        distillation(t, s, student_temperature).mean()
        for i, t in enumerate(teacher_probs)
        for j, s in enumerate(student_logits)
        if i != j
    ]
    return sum(terms) / len(terms)


def ibot_mim_loss(
    teacher_probs: list[torch.Tensor],
    student_logits: list[torch.Tensor],
    masks: list[torch.Tensor],
    student_temperature: float,
) -> torch.Tensor:
    """Masked-patch self-distillation, same view.

    Args:
        teacher_probs: ``(B, N, K)`` teacher patch distributions per global view.
        student_logits: ``(B, N, K)`` student patch logits per (masked) global view.
        masks: ``(B, N)`` bool per view.

    Returns:
        Mean over views and images of ``Σ_masked CE / max(1, #masked)``.
    """
    terms = []
    for t, s, m in zip(teacher_probs, student_logits, masks):
        ce = distillation(t, s, student_temperature) * m  # (B, N)
        terms.append((ce.sum(-1) / m.sum(-1).clamp_min(1)).mean())
    return sum(terms) / len(terms)


@dataclass(frozen=True)
class IBOTConfig:
    """Options of :class:`IBOT` (defaults: the iBOT paper's ViT-S/16 recipe).

    Attributes:
        out_dim, hidden_dim, bottleneck_dim: the shared DINO head.
        student_temperature: τ_s.
        teacher_temperature, warmup_teacher_temperature: τ_t after and at the start of
            the warm-up, which lasts ``teacher_temperature_warmup`` of training.
        center_momentum: EMA momentum of the two centres.
        mask_probability: probability that an image is masked at all.
        mask_ratio: range of the prediction ratio of masked images.
        mim_weight: weight of the MIM term.
        ema_decay, ema_final: teacher momentum, cosine from the first to the second.
        local_crops: number of local crops (student only, CLS term only).
    """

    out_dim: int = 8192
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    student_temperature: float = 0.1
    teacher_temperature: float = 0.07
    warmup_teacher_temperature: float = 0.04
    teacher_temperature_warmup: float = 0.1
    center_momentum: float = 0.9
    mask_probability: float = 0.5
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mim_weight: float = 1.0
    ema_decay: float = 0.996
    ema_final: float = 1.0
    local_crops: int = 10


class StudentTeacherNet(nn.Module):
    """Backbone + shared head."""

    def __init__(self, backbone: Backbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head


@OBJECTIVES.register("ibot")
class IBOT(Objective):
    """CLS and MIM self-distillation with centring and a warming teacher."""

    name = "ibot"
    Config = IBOTConfig

    def __init__(self, backbone: Backbone, config: IBOTConfig) -> None:
        if not backbone.supports_masking:
            raise InputError(
                f"the ibot objective replaces masked patch tokens by a mask token, which only "
                f"a ViT has; {backbone.arch} is a feature-map backbone. Pretrain it with "
                "hummingbird, hummingbird++, local_global or co2, or give a ViT --arch"
            )
        super().__init__(config)
        head = DINOHead(
            backbone.embed_dim, config.out_dim, config.hidden_dim, config.bottleneck_dim
        )
        self.student = StudentTeacherNet(backbone, head)
        self.teacher = make_target(self.student)
        self.mask_token = nn.Parameter(torch.zeros(backbone.embed_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.register_buffer("center_cls", torch.zeros(config.out_dim))
        self.register_buffer("center_patch", torch.zeros(config.out_dim))

    @property
    def backbone(self) -> Backbone:
        return self.student.backbone

    def export_backbone(self) -> Backbone:
        return self.teacher.backbone

    def views(self, crop_size: int, min_scale: float | None = None) -> MultiView:
        p = self.backbone.patch_size
        local = max(p, int(round(crop_size * 96 / 224 / p)) * p)
        grid = (crop_size // p, crop_size // p)
        masker = PredictionRatioMasker(
            grid, 1.0 - self.config.mask_probability, self.config.mask_ratio
        )
        scale = (min_scale if min_scale is not None else 0.14, 1.0)
        return multicrop_views(crop_size, self.config.local_crops, local, scale, masker=masker)

    def teacher_temperature(self, progress: float) -> float:
        cfg = self.config
        if cfg.teacher_temperature_warmup <= 0 or progress >= cfg.teacher_temperature_warmup:
            return cfg.teacher_temperature
        f = progress / cfg.teacher_temperature_warmup
        return cfg.warmup_teacher_temperature + f * (
            cfg.teacher_temperature - cfg.warmup_teacher_temperature
        )

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        if batch.masks is None or len(batch.masks) < 2:
            raise ValueError("iBOT batches need one patch mask per global view (use IBOT.views())")
        cfg = self.config
        globals_, locals_ = batch.views[:2], batch.views[2:]
        tau_t = self.teacher_temperature(progress)

        with torch.no_grad():
            t_cls, t_patch = [], []
            for v in globals_:
                out = self.teacher.backbone(v)
                t_cls.append(full_precision(self.teacher.head(out.cls)))
                t_patch.append(full_precision(self.teacher.head(out.tokens)))
            p_cls = [F.softmax((t - self.center_cls) / tau_t, dim=-1) for t in t_cls]
            p_patch = [F.softmax((t - self.center_patch) / tau_t, dim=-1) for t in t_patch]

        s_cls, s_patch, flat_masks = [], [], []
        for v, m in zip(globals_, batch.masks):
            out = self.student.backbone(v, mask=m, mask_token=self.mask_token)
            s_cls.append(self.student.head(out.cls))
            s_patch.append(self.student.head(out.tokens))
            flat_masks.append(m.flatten(1).to(s_patch[-1].dtype))
        for v in locals_:
            s_cls.append(self.student.head(self.student.backbone(v).cls))

        tau_s = cfg.student_temperature
        cls_loss = ibot_cls_loss(p_cls, s_cls, tau_s)
        mim_loss = ibot_mim_loss(p_patch, s_patch, flat_masks, tau_s)
        self.update_centers(t_cls, t_patch)
        return {
            "cls": cls_loss,
            "mim": cfg.mim_weight * mim_loss,
            "loss": cls_loss + cfg.mim_weight * mim_loss,
        }

    @torch.no_grad()
    def update_centers(self, t_cls: list[torch.Tensor], t_patch: list[torch.Tensor]) -> None:
        """EMA of the teacher's mean output over the global batch (both global views)."""
        m = self.config.center_momentum
        cls_mean = mean_over_processes(torch.cat(t_cls).mean(dim=0))
        patch_mean = mean_over_processes(torch.cat(t_patch).mean(dim=(0, 1)))
        self.center_cls.lerp_(cls_mean.to(self.center_cls.dtype), 1.0 - m)
        self.center_patch.lerp_(patch_mean.to(self.center_patch.dtype), 1.0 - m)

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        decay = cosine_decay(progress, self.config.ema_decay, self.config.ema_final)
        ema_update(self.teacher, self.student, decay)
