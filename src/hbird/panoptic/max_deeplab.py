"""MaX-DeepLab: a mask transformer for end-to-end panoptic segmentation (thesis §4.3).

The model (registered ``"max-deeplab"`` in :data:`~hbird.panoptic.specialist.SPECIALISTS`):

* **backbone**: an Axial-ResNet (:class:`hbird.nn.axial_resnet.AxialResNet`) whose
  stages end at strides 4, 8 and 16 (the ``"s"`` preset is Axial-ResNet-S without its
  last stage: MaX-DeepLab-S replaces that stage by dual-path blocks, thesis §4.4.1);
* **dual-path transformer**: :class:`~hbird.nn.dual_path.DualPathBlock` s between the
  pixel path and a learnable memory of ``N`` slots (P2P axial or conv, P2M eq. 4.13,
  M2P + M2M eq. 4.14, FFN; 8 heads), ``blocks = (b16, b8, b4)`` of them at strides 16,
  8 and 4: after the backbone at stride 16, and in the decoder at strides 8 and 4
  (Table 4.5: transformer blocks at stride 8 too add 1.0% PQ);
* **decoder**: stride 16 → 8 → 4, features fused by summation after bilinear resizing,
  then a convolution and that stride's dual-path blocks (§4.3.3). Stacked ``L`` times
  (``decoder_stacks``, hourglass-style, §4.3.3 and Table 4.4), it then traverses
  4 → 8 → 16 → 8 → 4 ``L`` more times: at each stride the resized feature is added to
  the latest feature at that stride and a 3×3 convolution block follows (the thesis
  allows "convolutional blocks or transformer blocks"; these are convolutional, the
  dual-path blocks stay in the first pass). ``L = 0`` (not stacked) is MaX-DeepLab-S's;
  MaX-DeepLab-L's ``L = 2`` also adds shortcuts from the two previous outputs of each
  stride (§C.6), which are not built;
* **heads** (eq. 4.15): classes ``p̂ = softmax(2FC(memory))`` over ``C + 1`` (the last
  is ∅); masks ``m̂ = softmax_N(BN(f · g))`` with ``f = BN(2FC(memory)) (N, D)`` and
  ``g = BN(2Conv(decoder)) (D, H/4, W/4)``; a semantic head on its own decoder from the
  backbone when ``L = 0``, otherwise on the first decoder output at stride 4 (§4.3.4).

Training (:meth:`MaXDeepLab.loss`) is :mod:`hbird.panoptic.losses`: 3 · L_PQ + 1 ·
instance discrimination + 0.3 · mask-ID cross-entropy + 1 · semantic cross-entropy
(``LOSS_WEIGHTS``, thesis §4.4), the first and last two on logits resized to
``1 / loss_stride`` of the input, instance discrimination on the stride-4 ``g`` (eq.
4.16); targets are sampled at the centre of each cell.

Inference (:meth:`MaXDeepLab.predict`, thesis §4.3.1 and §4.4): masks upsampled
bilinearly to the image; a mask whose class is ∅ or whose class confidence is below 0.7
is void; each pixel takes the argmax mask (eq. 4.4) and is void if that mask is void or
its probability is below 0.4; stuff regions under 4096 px and thing masks under 256 px
become void, at COCO's 641 × 641 inference size (thesis §4.4: "We resize and pad images
to 641 × 641 for inference"), i.e. as fractions of the image area.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hbird.data.panoptic import PanopticMap
from hbird.errors import InputError
from hbird.nn.axial import ChannelsLastBatchNorm
from hbird.nn.axial_resnet import AxialResNet
from hbird.nn.dual_path import DualPathBlock
from hbird.panoptic.grouping import merge_semantic_and_instances
from hbird.panoptic.losses import (
    LOSS_WEIGHTS,
    ground_truth_masks,
    instance_discrimination,
    mask_id_cross_entropy,
    pq_style_loss,
    semantic_cross_entropy,
)
from hbird.panoptic.specialist import SPECIALISTS, PanopticSpecialist, PanopticTarget

COCO_INFERENCE_SIDE = 641
"""The thesis' COCO inference size (§4.4), the scale of the area limits."""
STUFF_AREA = 4096 / COCO_INFERENCE_SIDE**2
"""Stuff area limit (4096 px at 641 × 641) as a fraction of the image."""
THING_AREA = 256 / COCO_INFERENCE_SIDE**2
"""Thing area limit (256 px at 641 × 641) as a fraction of the image."""
CLASS_THRESHOLD = 0.7
"""Masks whose class confidence is below this are void (thesis §4.4)."""
PIXEL_THRESHOLD = 0.4
"""Pixels whose mask-ID confidence is below this are void (thesis §4.4)."""
MASK_STRIDE = 4


@dataclass(frozen=True)
class MaXDeepLabConfig:
    """Every size of the model (presets: :data:`PRESETS`).

    Attributes:
        backbone_depths: blocks of the backbone's stages (strides 4, 8, 16).
        backbone_width: Axial-ResNet channel multiplier (0.5 = S).
        backbone_heads, backbone_span: of the backbone's axial blocks.
        stem_width: backbone stem channels (default ``64 · width``).
        blocks: dual-path blocks at strides 16, 8 and 4 (the last two in the decoder).
        pixel_dim: their pixel-path channels (the backbone's stride-16 output is
            projected to it when it differs).
        memory_dim: memory channels. attention_width: attention (and P2P bottleneck)
            channels of the dual-path blocks. heads: their attention heads.
        pixel_block: P2P of the dual-path blocks, ``"axial"`` or ``"conv"``.
        span: P2P axial span.
        decoder_dim: channels of both decoders.
        decoder_stacks: ``L``, the decoder's extra 4 → 8 → 16 → 8 → 4 passes (0 = not
            stacked, MaX-DeepLab-S; Table 4.4 has 1 and 2).
        slots: ``N``, the memory length and number of predicted masks.
        mask_dim: ``D``, channels of ``f`` and ``g``.
        loss_stride: the PQ-style, mask-ID and semantic losses compare the logits,
            bilinearly resized to ``1 / loss_stride`` of the input, with the targets
            there (4: the masks' own stride; 1: the input resolution, the upsampled m̂
            of §4.3.3). Instance discrimination is always at stride 4 (eq. 4.16).
    """

    backbone_depths: tuple[int, ...] = (3, 4, 6)
    backbone_width: float = 0.5
    backbone_heads: int = 8
    backbone_span: int = 65
    stem_width: int | None = None
    blocks: tuple[int, int, int] = (3, 0, 0)
    pixel_dim: int = 512
    memory_dim: int = 256
    attention_width: int = 256
    heads: int = 8
    pixel_block: str = "axial"
    span: int = 65
    decoder_dim: int = 256
    decoder_stacks: int = 0
    slots: int = 128
    mask_dim: int = 128
    loss_stride: int = 4


PRESETS = {
    "s": MaXDeepLabConfig(),
    "tiny": MaXDeepLabConfig(
        backbone_depths=(1, 1, 1),
        backbone_width=1 / 16,
        backbone_heads=2,
        backbone_span=9,
        stem_width=8,
        blocks=(1, 1, 1),
        pixel_dim=32,
        memory_dim=32,
        attention_width=32,
        span=9,
        decoder_dim=32,
        slots=8,
        mask_dim=32,
        pixel_block="conv",
        loss_stride=1,
    ),
}
"""``s``: the thesis' settings (N = D = 128, 8 heads, 3 axial dual-path blocks at
stride 16 on Axial-ResNet-S; MaX-DeepLab-S's exact widths are in its Fig. C.9, not in
the text). ``tiny``: the 32-channel, 3-block, N = 8 model of issue 13's acceptance, one
block per stride (on 64-pixel scenes stride 16 is a 4 × 4 grid, too coarse alone for
the memory to tell touching instances apart), convolutional P2P (the thesis' ablation
baseline, §4.4.2) and losses at the input resolution (at stride 4 a 64-pixel scene's
instances are 4-7 cells across). Measured on 64 val scenes of ``synthetic_panoptic``
(AdamW 2e-3, batch 8, 64 px, 250 steps): axial P2P with stride-4 losses PQ 0.36,
this preset 0.45 (0.58 after 750 steps)."""


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


STACKED_STRIDES = (8, 16, 8, 4)
"""The strides one extra pass of the stacked decoder visits, from stride 4."""


class DecoderOutput(NamedTuple):
    """``features`` ``(B, dim, H/4, W/4)`` (the last stride-4 output), the ``memory``
    ``(B, N, M)`` (None without blocks) and ``first`` ``(B, dim, H/4, W/4)``, the first
    pass's stride-4 output (``features`` itself when not stacked)."""

    features: torch.Tensor
    memory: torch.Tensor | None
    first: torch.Tensor


class Decoder(nn.Module):
    """Stride 16 → 8 → 4: resize, add the projected skip feature, one 3×3 convolution,
    then that stride's dual-path blocks (if any; they carry the memory along); then
    ``stacks`` passes over :data:`STACKED_STRIDES`, each stage a 3×3 convolution of the
    resized feature plus the latest feature at its stride.

    ``forward(x16, x8, x4, memory)`` with ``(B, C_i, ·, ·)`` maps and ``memory (B, N, M)``
    (or None without blocks) → :class:`DecoderOutput`.
    """

    def __init__(
        self,
        in_dims: Sequence[int],
        dim: int,
        blocks: Sequence[Sequence[DualPathBlock]] = ((), ()),
        stacks: int = 0,
    ) -> None:
        super().__init__()
        c16, c8, c4 = in_dims
        self.proj16 = _conv_bn_relu(c16, dim, 1)
        self.skip8, self.skip4 = _conv_bn_relu(c8, dim, 1), _conv_bn_relu(c4, dim, 1)
        self.fuse8, self.fuse4 = _conv_bn_relu(dim, dim), _conv_bn_relu(dim, dim)
        self.blocks8, self.blocks4 = (nn.ModuleList(b) for b in blocks)
        self.stacked = nn.ModuleList(
            nn.ModuleList(_conv_bn_relu(dim, dim) for _ in STACKED_STRIDES) for _ in range(stacks)
        )

    def forward(
        self,
        x16: torch.Tensor,
        x8: torch.Tensor,
        x4: torch.Tensor,
        memory: torch.Tensor | None = None,
    ) -> DecoderOutput:
        y = self.proj16(x16)
        latest = {16: y}
        stages = (
            (8, self.skip8, self.fuse8, self.blocks8, x8),
            (4, self.skip4, self.fuse4, self.blocks4, x4),
        )
        for stride, skip, fuse, blocks, x in stages:
            y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(y + skip(x))
            if len(blocks):
                pixels = y.permute(0, 2, 3, 1)
                for block in blocks:
                    pixels, memory = block(pixels, memory)
                y = pixels.permute(0, 3, 1, 2)
            latest[stride] = y
        first = y
        for convs in self.stacked:
            for stride, conv in zip(STACKED_STRIDES, convs):
                same = latest[stride]
                y = F.interpolate(y, size=same.shape[-2:], mode="bilinear", align_corners=False)
                y = latest[stride] = conv(y + same)
        return DecoderOutput(y, memory, first)


def _two_fc(cin: int, hidden: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(cin, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, cout))


class MaXDeepLab(PanopticSpecialist):
    """MaX-DeepLab (see the module docstring).

    Args:
        num_classes: ``C`` (stuff and things); the class head has ``C + 1`` outputs.
        thing_classes, ignore_index: as :class:`PanopticSpecialist`.
        preset: a name in :data:`PRESETS`.
        **overrides: :class:`MaXDeepLabConfig` fields replacing the preset's.

    ``forward`` returns ``mask_logits (B, N, H/4, W/4)`` (the masks are their softmax over
    slots), ``class_logits (B, N, C + 1)``, ``mask_features`` = ``g`` ``(B, D, H/4, W/4)``
    and ``semantic_logits (B, C, H/4, W/4)``.
    """

    name = "max-deeplab"

    def __init__(
        self,
        num_classes: int,
        thing_classes: Sequence[int],
        ignore_index: int = 255,
        preset: str = "s",
        **overrides: Any,
    ) -> None:
        super().__init__(num_classes, thing_classes, ignore_index)
        if preset not in PRESETS:
            raise InputError(
                f"max-deeplab: preset must be one of {', '.join(PRESETS)}, got {preset!r}"
            )
        known = [f.name for f in fields(MaXDeepLabConfig)]
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise InputError(
                f"max-deeplab does not take {', '.join(unknown)}; it takes preset, "
                f"{', '.join(known)}"
            )
        for key in ("backbone_depths", "blocks"):  # lists from JSON options
            if key in overrides:
                overrides[key] = tuple(overrides[key])
        self.preset, self.overrides = preset, dict(overrides)
        self.config = cfg = replace(PRESETS[preset], **overrides)
        if len(cfg.backbone_depths) != 3:
            raise ValueError("backbone_depths must give the 3 stages at strides 4, 8, 16")
        self.backbone = AxialResNet(
            depths=cfg.backbone_depths,
            width=cfg.backbone_width,
            heads=cfg.backbone_heads,
            span=cfg.backbone_span,
            output_stride=16,
            stem_width=cfg.stem_width,
            zero_init_residual=False,
        )
        c4, c8, c16 = self.backbone.stage_channels
        self.pixel_proj = (
            nn.Identity() if c16 == cfg.pixel_dim else _conv_bn_relu(c16, cfg.pixel_dim, 1)
        )
        self.memory = nn.Parameter(torch.randn(cfg.slots, cfg.memory_dim))
        if len(cfg.blocks) != 3:
            raise ValueError("blocks must give the dual-path blocks at strides 16, 8, 4")

        def dual_path(pixel_dim: int, count: int) -> list[DualPathBlock]:
            return [
                DualPathBlock(
                    pixel_dim,
                    cfg.memory_dim,
                    cfg.attention_width,
                    heads=cfg.heads,
                    pixel_block=cfg.pixel_block,
                    span=cfg.span,
                )
                for _ in range(count)
            ]

        b16, b8, b4 = cfg.blocks
        self.blocks = nn.ModuleList(dual_path(cfg.pixel_dim, b16))
        if cfg.decoder_stacks < 0:
            raise InputError(f"max-deeplab: decoder_stacks must be >= 0, got {cfg.decoder_stacks}")
        self.decoder = Decoder(
            (cfg.pixel_dim, c8, c4),
            cfg.decoder_dim,
            (dual_path(cfg.decoder_dim, b8), dual_path(cfg.decoder_dim, b4)),
            stacks=cfg.decoder_stacks,
        )
        self.mask_feature = nn.Sequential(  # 2Conv → g, batch-normalised
            _conv_bn_relu(cfg.decoder_dim, cfg.decoder_dim),
            nn.Conv2d(cfg.decoder_dim, cfg.mask_dim, 1, bias=False),
            nn.BatchNorm2d(cfg.mask_dim),
        )
        self.memory_feature = _two_fc(cfg.memory_dim, cfg.memory_dim, cfg.mask_dim)  # 2FC → f
        self.memory_norm = ChannelsLastBatchNorm(cfg.mask_dim)  # BN of f over (batch, slots)
        self.mask_norm = nn.BatchNorm2d(1)  # BN on f · g
        self.class_head = _two_fc(cfg.memory_dim, cfg.memory_dim, num_classes + 1)
        self.semantic_decoder = (  # stacked: the semantic head reads the first stride-4 output
            Decoder((c16, c8, c4), cfg.decoder_dim) if cfg.decoder_stacks == 0 else None
        )
        self.semantic_head = nn.Sequential(
            _conv_bn_relu(cfg.decoder_dim, cfg.decoder_dim),
            nn.Conv2d(cfg.decoder_dim, num_classes, 1),
        )

    @property
    def size_multiple(self) -> int:
        return 16

    def options(self) -> dict[str, Any]:
        return {"preset": self.preset, **self.overrides}

    def load_backbone(self, path: str) -> None:
        """Load an Axial-ResNet weights file (an ``hbird pretrain`` export, or
        csrhddlam/axial-deeplab's layout) into the 3-stage backbone: the stem and the
        stages it has. A 4-stage model's last stage and classifier are left out
        (MaX-DeepLab-S replaces that stage by dual-path blocks, thesis §4.4.1).

        Raises:
            InputError: a kept tensor has another shape (the file's widths, heads or
                span differ from ``backbone_width``, ``stem_width``, ``backbone_heads``,
                ``backbone_span``), or the file misses blocks of the kept stages.
        """
        from hbird.encoders.checkpoints import load_weights

        backbone = self.backbone
        own = backbone.state_dict()

        def existing_stages(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            state = backbone.convert_state_dict(state)
            kept = {k: v for k, v in state.items() if not _beyond_stages(k, len(backbone.stages))}
            wrong = [k for k, v in kept.items() if k in own and v.shape != own[k].shape]
            if wrong:
                key = wrong[0]
                raise InputError(
                    f"weights file {path} does not fit max-deeplab's backbone: {len(wrong)} "
                    f"tensors of its stem and first {len(backbone.stages)} stages have other "
                    f"shapes, e.g. {key} {tuple(kept[key].shape)} in the file vs "
                    f"{tuple(own[key].shape)} here; build the model with the file's widths "
                    "(--specialist-option backbone_width=..., stem_width=..., "
                    "backbone_heads=..., backbone_span=...)"
                )
            return kept

        load_weights(
            backbone,
            path,
            arch="max-deeplab's backbone",
            convert=existing_stages,
            hint="Give an Axial-ResNet checkpoint with at least the backbone's blocks "
            f"{self.config.backbone_depths} in its first stages.",
        )

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images (B, 3, H, W)`` normalised, sides multiples of 16 → the heads' outputs."""
        x4, x8, x16 = self.backbone.forward_stages(images, [0, 1, 2])
        pixels = self.pixel_proj(x16).permute(0, 2, 3, 1)  # (B, h, w, C)
        memory = self.memory.expand(images.shape[0], -1, -1)  # (B, N, M)
        for block in self.blocks:
            pixels, memory = block(pixels, memory)
        decoded, memory, first = self.decoder(pixels.permute(0, 3, 1, 2), x8, x4, memory)
        semantic = (
            first if self.semantic_decoder is None else self.semantic_decoder(x16, x8, x4).features
        )
        g = self.mask_feature(decoded)  # (B, D, h4, w4)
        f = self.memory_feature(memory)  # (B, N, D)
        f = self.memory_norm(f)
        b, _, h, w = g.shape
        logits = torch.einsum("bnd,bdp->bnp", f, g.flatten(2))[:, None]  # (B, 1, N, h·w)
        return {
            "mask_logits": self.mask_norm(logits).view(b, -1, h, w),
            "class_logits": self.class_head(memory),
            "mask_features": g,
            "semantic_logits": self.semantic_head(semantic),
        }

    def loss(
        self, outputs: dict[str, torch.Tensor], targets: Sequence[PanopticTarget]
    ) -> dict[str, torch.Tensor]:
        """The mean over images of each term, and ``loss`` = their ``LOSS_WEIGHTS`` sum.

        Every term is normalised within its image (:mod:`hbird.panoptic.losses`), so the
        batch mean on ``W`` processes of ``B / W`` images each, averaged by DDP, is the
        one-process loss on all ``B``. Outputs in half precision are upcast to float32
        (float64 stays float64)."""
        from hbird.pretrain.distributed import full_precision  # hbird.pretrain is heavy

        outputs = {k: full_precision(v) for k, v in outputs.items()}
        features = outputs["mask_features"]
        device = features.device
        stride = self.config.loss_stride
        height, width = targets[0].semantic.shape
        size = (height // stride, width // stride)
        mask_logits, semantic_logits = (
            F.interpolate(outputs[k], size=size, mode="bilinear", align_corners=False)
            if outputs[k].shape[-2:] != size
            else outputs[k]
            for k in ("mask_logits", "semantic_logits")
        )
        terms: dict[str, list[torch.Tensor]] = {k: [] for k in LOSS_WEIGHTS}
        for b, target in enumerate(targets):
            semantic = _cell_centres(target.semantic, size).to(device)
            instance = _cell_centres(target.instance, size).to(device)
            gt = ground_truth_masks(semantic, instance, self.thing_classes, self.ignore_index)
            pq = pq_style_loss(mask_logits[b], outputs["class_logits"][b], gt)
            terms["pq"].append(pq.loss)
            terms["mask_id"].append(
                mask_id_cross_entropy(mask_logits[b], gt, pq.gt_index, pq.slot_index)
            )
            terms["semantic"].append(
                semantic_cross_entropy(semantic_logits[b], semantic, self.ignore_index)
            )
            if stride != MASK_STRIDE:  # eq. 4.16-4.17 on stride-4 ground truth
                cells = features.shape[-2:]
                semantic = _cell_centres(target.semantic, cells).to(device)
                instance = _cell_centres(target.instance, cells).to(device)
                gt = ground_truth_masks(semantic, instance, self.thing_classes, self.ignore_index)
            terms["instance_discrimination"].append(instance_discrimination(features[b], gt))
        losses = {k: torch.stack(v).mean() for k, v in terms.items()}
        losses["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in losses.items())
        return losses

    @torch.no_grad()
    def predict(
        self, outputs: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> list[PanopticMap]:
        """Panoptic maps by the thesis' inference rules (module docstring)."""
        mask_logits = outputs["mask_logits"]
        if size is None:
            size = (MASK_STRIDE * mask_logits.shape[-2], MASK_STRIDE * mask_logits.shape[-1])
        masks = F.interpolate(
            mask_logits.float().softmax(dim=1), size=size, mode="bilinear", align_corners=False
        )
        classes = outputs["class_logits"].float().softmax(dim=-1)
        return [self._panoptic_map(m, p) for m, p in zip(masks, classes)]

    def _panoptic_map(self, masks: torch.Tensor, classes: torch.Tensor) -> PanopticMap:
        """``masks (N, H, W)`` probabilities, ``classes (N, C + 1)`` → a PanopticMap."""
        confidence, label = classes.max(dim=-1)
        kept = (label != self.num_classes) & (confidence >= CLASS_THRESHOLD)
        best, slot = masks.cpu().max(dim=0)
        label, kept = label.cpu(), kept.cpu()
        void = (best < PIXEL_THRESHOLD) | ~kept[slot]
        semantic = torch.where(void, self.ignore_index, label[slot])
        # instance ids: slots ranked by their first pixel (raster order), so the
        # numbering does not depend on the order of the slots
        flat = torch.where(void, -1, slot).flatten()
        first = torch.full((len(classes),), flat.numel(), dtype=torch.int64)
        present = flat >= 0
        positions = torch.arange(flat.numel())
        first.scatter_reduce_(0, flat[present], positions[present], reduce="amin")
        rank = torch.empty_like(first)
        rank[torch.argsort(first, stable=True)] = torch.arange(len(first))
        instances = torch.where(void, 0, rank[slot] + 1)
        return merge_semantic_and_instances(
            semantic,
            instances,
            self.thing_classes,
            self.ignore_index,
            stuff_area=STUFF_AREA,
            thing_area=THING_AREA,
        )


def _beyond_stages(key: str, stages: int) -> bool:
    """Whether an Axial-ResNet state-dict ``key`` belongs to a stage after the first
    ``stages`` or to the classifier."""
    match = re.match(r"stages\.(\d+)\.", key)
    return key.startswith("fc.") or (match is not None and int(match.group(1)) >= stages)


def _cell_centres(label: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``(H, W)`` labels → ``size`` ``(h, w)``: the label at the centre of each cell."""
    height, width = label.shape
    ys = ((torch.arange(size[0]) + 0.5) * height / size[0]).long().clamp_max(height - 1)
    xs = ((torch.arange(size[1]) + 0.5) * width / size[1]).long().clamp_max(width - 1)
    return label.cpu()[ys[:, None], xs[None, :]]


SPECIALISTS.register("max-deeplab", MaXDeepLab)
