"""Axial-DeepLab (Wang 2021, thesis §3.3.2): Panoptic-DeepLab's heads on an Axial-ResNet.

    model = create_specialist("panoptic-deeplab", num_classes=19, thing_classes=range(11, 19))

* **Backbone**: a registered feature-map encoder's model at output stride 16, by
  default ``axial_deeplab_l`` (Axial-ResNet-L, last stage unstrided, span 65); no ASPP
  (thesis §3.3.2: the axial blocks already see globally) — the last stage is projected
  by a 1×1 convolution where Panoptic-DeepLab has its ASPP.
* **Dual decoders** (Panoptic-DeepLab, Cheng et al. 2020): a semantic one (256
  channels) and an instance one (128). Each upsamples ×2 to stride 8, concatenates the
  stride-8 backbone features projected by a 1×1 conv (64 / 32 channels), fuses by a
  5×5 depthwise-separable conv; then the same at stride 4 (skip 32 / 16 channels).
* **Heads**: a 5×5 depthwise-separable conv and a 1×1 conv each: semantic logits
  (head 256 channels), the centre heatmap (32) and the offsets (32) from the instance
  decoder. They predict at stride 4 and are upsampled bilinearly to the input (the
  offsets, in stride-4 pixels, multiplied by 4): every output is at the input size.
* **Losses** (weights 1, 200, 0.01): semantic cross-entropy on the hardest 20 % of the
  labelled pixels (:func:`hard_pixel_cross_entropy`); centre-heatmap MSE over pixels
  that are neither void nor crowd (:func:`heatmap_mse`); offsets L1, ``|dy| + |dx|``
  averaged over the pixels of thing instances (:func:`offset_l1`). Targets come from
  the instance map at the input size (:mod:`hbird.panoptic.targets`, σ = 8 px).
* **Normalisation**: each term is normalised within its image (its hardest 20 % of
  pixels, its non-void pixels, its thing pixels) and averaged over the images, as
  google-research/deeplab2 (the authors' code) does: its losses return one value per
  sample, averaged over the global batch. So on ``W`` processes with ``B / W`` images
  each, DDP's average of the local batch means is the one-process loss on all ``B``
  images, with nothing to share across processes; top-k over the pooled pixels of the
  batch would not split that way. (deeplab2 takes 20 % of all of an image's pixels, void
  included, and averages the non-zero ones; hbird takes 20 % of the labelled ones. Its
  offset L1 is the mean over ``(dy, dx)``, half of hbird's ``|dy| + |dx|`` at the same
  weight 0.01.)
* **Inference** (:mod:`hbird.panoptic.grouping`): centres are the heatmap's 7×7
  max-pool peaks above 0.1; each pixel of a predicted thing class goes to the centre
  nearest to ``p + offset(p)``; an instance takes the majority class of its pixels'
  semantic prediction; stuff segments under 2048 px at 1024×2048 (scaled to the image
  area) become void. There is no thing area limit (Panoptic-DeepLab has none).

``decoder_width`` scales every decoder and head channel count (1 = the paper's);
:data:`TINY_OPTIONS` (``backbone="test_axial", decoder_width=0.5``) is the tiny CPU model
of the acceptance test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hbird.data.panoptic import PanopticMap
from hbird.panoptic.grouping import (
    CENTRE_THRESHOLD,
    NMS_KERNEL,
    STUFF_AREA,
    assign_to_centres,
    find_centres,
    merge_semantic_and_instances,
)
from hbird.panoptic.specialist import SPECIALISTS, PanopticSpecialist, PanopticTarget
from hbird.panoptic.targets import CENTRE_SIGMA, panoptic_targets

TOP_K_PIXELS = 0.2
"""Hard pixel mining: the fraction of labelled pixels the semantic loss averages over."""
LOSS_WEIGHTS = {"semantic": 1.0, "centre": 200.0, "offset": 0.01}
"""Panoptic-DeepLab's loss weights (offsets in input pixels)."""
DEFAULT_BACKBONE = "axial_deeplab_l"
DECODER_CHANNELS = {"semantic": 256, "instance": 128}
SKIP_CHANNELS = {"semantic": (64, 32), "instance": (32, 16)}
"""Projected stride-8 and stride-4 skip features of each decoder."""
HEAD_CHANNELS = {"semantic": 256, "centre": 32, "offset": 32}
HEAD_STRIDE = 4
TINY_OPTIONS = {"backbone": "test_axial", "decoder_width": 0.5}
"""A CPU-sized Axial-DeepLab (0.17M parameters): ``test_axial`` (width 1/16, one block per
stage, span 9) and half-width decoders and heads."""


# -- losses ---------------------------------------------------------------------------------


def per_image_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``mean_b (Σ w_b v_b / Σ w_b)`` over the batch of ``(B, ...)`` values and weights
    (an image with ``Σ w_b = 0`` counts 0)."""
    dims = tuple(range(1, values.ndim))
    total = weight.sum(dims)
    loss = (weight * values).sum(dims)
    return torch.where(total > 0, loss / total.clamp_min(1e-12), loss * 0.0).mean()


def hard_pixel_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, top_k: float = TOP_K_PIXELS
) -> torch.Tensor:
    """Cross-entropy averaged over the ``top_k`` fraction of each image's labelled pixels
    with the largest loss (DeepLab's hard pixel mining), then over the images.

    Args:
        logits: ``(B, C, H, W)``. labels: ``(B, H, W)`` int64, ``ignore_index`` = void.
        top_k: the fraction kept: ``max(1, int(top_k · labelled pixels))`` pixels of an
            image; an image without labelled pixels counts 0.
    """
    pixels = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    per_image = []
    for image_pixels, image_labels in zip(pixels, labels):
        kept = image_pixels[image_labels != ignore_index]
        if kept.numel() == 0:
            per_image.append(image_pixels.sum() * 0.0)
            continue
        keep = max(1, int(top_k * kept.numel()))
        per_image.append(torch.topk(kept, keep, sorted=False).values.mean())
    return torch.stack(per_image).mean()


def heatmap_mse(
    prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """``Σ w (pred − target)² / Σ w`` of each image's ``(H, W)`` maps, averaged over the
    ``B`` images of ``(B, H, W)`` (an image with ``Σ w = 0`` counts 0)."""
    return per_image_mean((prediction - target) ** 2, weight.to(prediction.dtype))


def offset_l1(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``Σ_mask (|dy − dŷ| + |dx − dx̂|) / |mask|`` of each image's ``(2, H, W)`` offsets and
    ``(H, W)`` mask, averaged over the ``B`` images (an image without masked pixels
    counts 0)."""
    l1 = (prediction - target).abs().sum(dim=1)  # (B, H, W)
    return per_image_mean(l1, mask.to(prediction.dtype))


# -- layers -------------------------------------------------------------------------------


def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
    """1×1 conv, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


def separable_conv(cin: int, cout: int, kernel: int = 5) -> nn.Sequential:
    """Depthwise ``kernel``×``kernel`` conv + BN + ReLU, then pointwise 1×1 + BN + ReLU."""
    return nn.Sequential(
        nn.Conv2d(cin, cin, kernel, padding=kernel // 2, groups=cin, bias=False),
        nn.BatchNorm2d(cin),
        nn.ReLU(),
        conv_bn_relu(cin, cout),
    )


class PanopticDecoder(nn.Module):
    """Panoptic-DeepLab's decoder without ASPP: stride 16 → 8 → 4 with two skips.

    Args:
        in_channels: channels of the ``(stride 4, stride 8, stride 16)`` backbone maps.
        channels: the decoder's width. skips: projected ``(stride 8, stride 4)`` skips.
    """

    def __init__(self, in_channels: Sequence[int], channels: int, skips: Sequence[int]) -> None:
        super().__init__()
        c4, c8, c16 = in_channels
        self.project = conv_bn_relu(c16, channels)  # where Panoptic-DeepLab has its ASPP
        self.skip8, self.fuse8 = (
            conv_bn_relu(c8, skips[0]),
            separable_conv(channels + skips[0], channels),
        )
        self.skip4, self.fuse4 = (
            conv_bn_relu(c4, skips[1]),
            separable_conv(channels + skips[1], channels),
        )

    def forward(self, s4: torch.Tensor, s8: torch.Tensor, s16: torch.Tensor) -> torch.Tensor:
        """NCHW maps at strides 4, 8, 16 → ``(B, channels, H/4, W/4)``."""
        y = self.project(s16)
        for skip, fuse, fine in ((self.skip8, self.fuse8, s8), (self.skip4, self.fuse4, s4)):
            y = F.interpolate(y, size=fine.shape[-2:], mode="bilinear", align_corners=False)
            y = fuse(torch.cat([y, skip(fine)], dim=1))
        return y


def prediction_head(cin: int, channels: int, cout: int) -> nn.Sequential:
    """A 5×5 depthwise-separable conv to ``channels``, then a 1×1 conv to ``cout`` outputs."""
    return nn.Sequential(separable_conv(cin, channels), nn.Conv2d(channels, cout, 1))


def _scaled(channels: int, width: float) -> int:
    return max(2, round(channels * width))


def build_backbone_model(name: str, options: dict[str, Any]) -> nn.Module:
    """The module of the registered feature-map encoder ``name`` (random weights), unfrozen."""
    from hbird.encoders import create_encoder

    encoder = create_encoder(name, pretrained=False, **options)
    if not hasattr(encoder.model, "forward_stages"):
        raise ValueError(
            f"backbone {name!r} is not a feature-map encoder with stages (forward_stages); "
            "use axial_deeplab_{s,m,l,xl}, test_axial or another staged backbone"
        )
    return encoder.model.requires_grad_(True).train()


def skip_stages(strides: Sequence[int], name: str) -> tuple[int, int, int]:
    """Indices of the stages Panoptic-DeepLab reads: the first at stride 4, the last at
    stride 8 and the last one (which must be at stride 16)."""
    strides = list(strides)
    if strides[-1] != 16 or 4 not in strides or 8 not in strides:
        raise ValueError(
            f"backbone {name!r} has stage strides {tuple(strides)}; Axial-DeepLab needs stages "
            "at strides 4 and 8 and an output stride of 16 (e.g. axial_deeplab_s, test_axial)"
        )
    return strides.index(4), len(strides) - 1 - strides[::-1].index(8), len(strides) - 1


# -- the model ------------------------------------------------------------------------------


class AxialDeepLab(PanopticSpecialist):
    """Axial-DeepLab (module docstring).

    Args:
        num_classes, thing_classes, ignore_index: the label space.
        backbone: a registered staged encoder at output stride 16 (``axial_deeplab_l``).
        backbone_options: its factory options.
        decoder_width: multiplier of every decoder and head width (1: the paper's).
        centre_threshold, nms_kernel, stuff_area: inference (0.1, 7, 2048 / (1024·2048)).
        sigma: the centre heatmap's σ in pixels (8).
    """

    name = "panoptic-deeplab"

    def __init__(
        self,
        num_classes: int,
        thing_classes: Sequence[int],
        ignore_index: int = 255,
        backbone: str = DEFAULT_BACKBONE,
        backbone_options: dict[str, Any] | None = None,
        decoder_width: float = 1.0,
        centre_threshold: float = CENTRE_THRESHOLD,
        nms_kernel: int = NMS_KERNEL,
        stuff_area: float = STUFF_AREA,
        sigma: float = CENTRE_SIGMA,
    ) -> None:
        super().__init__(num_classes, thing_classes, ignore_index)
        self._options = {
            "backbone": backbone,
            "backbone_options": dict(backbone_options or {}),
            "decoder_width": float(decoder_width),
            "centre_threshold": float(centre_threshold),
            "nms_kernel": int(nms_kernel),
            "stuff_area": float(stuff_area),
            "sigma": float(sigma),
        }
        self.backbone = build_backbone_model(backbone, self._options["backbone_options"])
        self.stages = skip_stages(self.backbone.stage_strides, backbone)
        channels = [self.backbone.stage_channels[i] for i in self.stages]
        w = float(decoder_width)
        decoder = {k: _scaled(v, w) for k, v in DECODER_CHANNELS.items()}
        head = {k: _scaled(v, w) for k, v in HEAD_CHANNELS.items()}
        skips = {k: [_scaled(c, w) for c in v] for k, v in SKIP_CHANNELS.items()}
        self.semantic_decoder = PanopticDecoder(channels, decoder["semantic"], skips["semantic"])
        self.instance_decoder = PanopticDecoder(channels, decoder["instance"], skips["instance"])
        self.semantic_head = prediction_head(decoder["semantic"], head["semantic"], num_classes)
        self.centre_head = prediction_head(decoder["instance"], head["centre"], 1)
        self.offset_head = prediction_head(decoder["instance"], head["offset"], 2)
        self.centre_threshold, self.nms_kernel = centre_threshold, nms_kernel
        self.stuff_area, self.sigma = stuff_area, sigma

    @property
    def size_multiple(self) -> int:
        return 16

    def options(self) -> dict[str, Any]:
        return dict(self._options)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Normalised ``(B, 3, H, W)`` → ``semantic`` ``(B, C, H, W)`` logits, ``centre``
        ``(B, 1, H, W)`` heatmap and ``offset`` ``(B, 2, H, W)`` ``(dy, dx)`` in pixels."""
        size = images.shape[-2:]
        s4, s8, s16 = self.backbone.forward_stages(images, list(self.stages))
        semantic = self.semantic_head(self.semantic_decoder(s4, s8, s16))
        instance = self.instance_decoder(s4, s8, s16)
        centre, offset = self.centre_head(instance), self.offset_head(instance)

        def up(x: torch.Tensor) -> torch.Tensor:
            return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

        scale = size[0] / semantic.shape[-2]  # HEAD_STRIDE for sides that are multiples of 16
        return {"semantic": up(semantic), "centre": up(centre), "offset": up(offset) * scale}

    def targets(self, targets: Sequence[PanopticTarget]) -> dict[str, torch.Tensor]:
        """The batch's ground truth: ``semantic`` ``(B, H, W)``, ``centre`` heatmaps and their
        ``centre_weight`` (0 on void and crowd) ``(B, H, W)``, ``offset`` ``(B, 2, H, W)``
        and ``offset_mask`` ``(B, H, W)`` (pixels of thing instances)."""
        out: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("semantic", "centre", "centre_weight", "offset", "offset_mask")
        }
        things = torch.as_tensor(self.thing_classes, dtype=torch.int64)
        for t in targets:
            semantic, instance = t.semantic.cpu().long(), t.instance.cpu().long()
            heatmap, offsets, mask = panoptic_targets(
                semantic, instance, self.thing_classes, self.sigma
            )
            crowd = torch.isin(semantic, things) & (instance == 0)
            out["semantic"].append(semantic)
            out["centre"].append(heatmap)
            out["centre_weight"].append((~crowd & (semantic != self.ignore_index)).float())
            out["offset"].append(offsets)
            out["offset_mask"].append(mask)
        return {k: torch.stack(v) for k, v in out.items()}

    def loss(
        self, outputs: dict[str, torch.Tensor], targets: Sequence[PanopticTarget]
    ) -> dict[str, torch.Tensor]:
        """``semantic``, ``centre`` and ``offset`` terms (unweighted) and ``loss`` =
        ``1 · semantic + 200 · centre + 0.01 · offset``."""
        from hbird.pretrain.distributed import full_precision  # hbird.pretrain is heavy

        out = {k: full_precision(v) for k, v in outputs.items()}
        device, dtype = out["semantic"].device, out["semantic"].dtype
        gt = {
            k: v.to(device, dtype) if v.is_floating_point() else v.to(device)
            for k, v in self.targets(targets).items()
        }
        terms = {
            "semantic": hard_pixel_cross_entropy(
                out["semantic"], gt["semantic"], self.ignore_index
            ),
            "centre": heatmap_mse(out["centre"][:, 0], gt["centre"], gt["centre_weight"]),
            "offset": offset_l1(out["offset"], gt["offset"], gt["offset_mask"]),
        }
        terms["loss"] = sum(LOSS_WEIGHTS[k] * v for k, v in terms.items())
        return terms

    @torch.no_grad()
    def predict(
        self, outputs: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> list[PanopticMap]:
        """Panoptic-DeepLab's grouping of each image's outputs (module docstring)."""
        semantic, centre, offset = outputs["semantic"], outputs["centre"], outputs["offset"]
        if size is not None and tuple(size) != tuple(semantic.shape[-2:]):
            scale = torch.tensor([size[0] / semantic.shape[-2], size[1] / semantic.shape[-1]])
            semantic, centre, offset = (
                F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
                for x in (semantic, centre, offset)
            )
            offset = offset * scale.to(offset)[None, :, None, None]
        maps = []
        for sem_logits, heat, off in zip(semantic, centre, offset):
            labels = sem_logits.argmax(dim=0).cpu()
            things = torch.isin(labels, torch.as_tensor(self.thing_classes, dtype=labels.dtype))
            centres = find_centres(heat[0].float().cpu(), self.centre_threshold, self.nms_kernel)
            instances = assign_to_centres(off.float().cpu(), things, centres)
            maps.append(
                merge_semantic_and_instances(
                    labels,
                    instances,
                    self.thing_classes,
                    self.ignore_index,
                    stuff_area=self.stuff_area,
                    thing_area=0.0,
                )
            )
        return maps


SPECIALISTS.register("panoptic-deeplab", AxialDeepLab)
