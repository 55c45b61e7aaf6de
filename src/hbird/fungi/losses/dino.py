"""DINO self-distillation loss (FUNGI, Table 17).

Multi-crop views (Table 17): 2 global crops (scale 0.25–1.0, 224 × 224) and 10 local crops
(scale 0.05–0.25, also 224 × 224: the input size, not DINO's 96), each image with its own
random boxes, bicubic, as FUNGI's code (``RandomResizedCrop`` per image). The ``fast``
preset keeps hbird's older, cheaper views: local crops at 96/224 of the input size, one
set of boxes for every image, bilinear. The same frozen backbone plays student
and teacher; they differ only in their independent random heads (output 2048). Embeddings
are L2-normalised before the heads. The teacher sees the global crops and receives no
gradient (stop-gradient, as in DINO); the student sees every crop. With temperatures
``τ_s = 0.1`` and ``τ_t = 0.07`` the per-sample loss is the cross-entropy summed over
every (teacher crop, student crop) pair, same-crop pairs included:

    L = − Σ_g Σ_v softmax(h_t(z_g) / τ_t) · log_softmax(h_s(z_v) / τ_s)

No centring is applied: nothing is trained, so there is no running centre to keep.
"""

from __future__ import annotations

from dataclasses import astuple
from typing import Any

import torch
import torch.nn.functional as F

from hbird.fungi.heads import RandomHead
from hbird.fungi.losses.base import LOSSES, GradientLoss
from hbird.fungi.views import BoxSource, CropBox, MultiCrop, ViewGroup


@LOSSES.register("dino")
class DINOLoss(GradientLoss):
    """DINO's cross-entropy between a teacher and a student head on multi-crop views.

    Args:
        backbone: an image backbone. seed: the extractor seed.
        head_dim: width of the student and teacher heads (Table 17: 2048).
        student_temperature, teacher_temperature: Table 17: 0.1 and 0.07.
        num_global, num_local: crops per image (Table 17: 2 and 10).
        global_scale, local_scale: crop area fractions (Table 17: 0.25–1.0, 0.05–0.25).
        global_size, local_size: crop sides in pixels (default: the input size for both,
            Table 17's 224 × 224); smaller local crops make CPU runs cheap.
        boxes: ``"per-image"`` (default, FUNGI's code), ``"shared"``, fixed boxes or a
            function of the canvas (:class:`~hbird.fungi.views.MultiCrop`).
        interpolation: ``"bicubic"`` (default, FUNGI's code) or ``"bilinear"``.
        crop_seed: seed of the crop boxes (default: the extractor seed).
    """

    name = "dino"
    modalities = ("image",)

    def __init__(
        self,
        backbone: Any,
        seed: int,
        head_dim: int = 2048,
        student_temperature: float = 0.1,
        teacher_temperature: float = 0.07,
        num_global: int = 2,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        global_size: int | None = None,
        local_size: int | None = None,
        boxes: BoxSource = "per-image",
        interpolation: str = "bicubic",
        crop_seed: int | None = None,
    ) -> None:
        super().__init__(backbone, seed)
        if student_temperature <= 0 or teacher_temperature <= 0:
            raise ValueError("dino: temperatures must be > 0")
        side, patch = backbone.image_size, backbone.patch_size
        global_size = global_size or side
        local_size = local_size or side
        crop_seed = seed if crop_seed is None else crop_seed
        for name, size in (("global_size", global_size), ("local_size", local_size)):
            if size % patch:
                raise ValueError(
                    f"dino: {name}={size} must be a multiple of the patch size {patch}"
                )
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.crops = MultiCrop(
            backbone.canvas_size,
            global_size,
            local_size,
            num_global=num_global,
            num_local=num_local,
            global_scale=tuple(global_scale),
            local_scale=tuple(local_scale),
            seed=crop_seed,
            boxes=boxes,
            interpolation=interpolation,
        )
        self.student = RandomHead(self.embed_dim, head_dim, seed, "dino.student")
        self.teacher = RandomHead(self.embed_dim, head_dim, seed, "dino.teacher")
        self.settings = {
            "head_dim": head_dim,
            "student_temperature": student_temperature,
            "teacher_temperature": teacher_temperature,
            "num_global": num_global,
            "num_local": num_local,
            "global_scale": list(global_scale),
            "local_scale": list(local_scale),
            "global_size": global_size,
            "local_size": local_size,
            "boxes": _boxes_setting(boxes),
            "interpolation": interpolation,
            "crop_seed": crop_seed,
        }

    def make_views(self, batch: torch.Tensor) -> list[ViewGroup]:
        return self.crops(batch)

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """``[(B, n_global, D), (B, n_local, D)]`` → ``(B,)``."""
        z = torch.cat([F.normalize(e, dim=-1) for e in embeddings], dim=1)  # (B, V, D)
        num_global = embeddings[0].shape[1]
        teacher = F.softmax(self.teacher(z[:, :num_global].detach()) / self.teacher_temperature, -1)
        student = F.log_softmax(self.student(z) / self.student_temperature, dim=-1)  # (B, V, K)
        return -torch.einsum("bgk,bvk->b", teacher, student)


def _boxes_setting(boxes: BoxSource) -> str | list[list[int]]:
    """``boxes`` as saved: the mode, the fixed boxes as lists, or ``"function"``."""
    if isinstance(boxes, str):
        return boxes
    if callable(boxes):
        return "function"
    return [list(astuple(b)) if isinstance(b, CropBox) else [int(v) for v in b] for b in boxes]
