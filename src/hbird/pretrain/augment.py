"""Per-objective view augmentations, drawn from an explicit ``torch.Generator``.

Each view is a random resized crop, horizontal flip, colour jitter (random order),
grayscale, Gaussian blur and solarisation with per-view probabilities. Every random
choice comes from the generator passed in, so a sample's views depend only on
``(seed, epoch, index)``, whichever process or data-loader worker draws them.

Presets:

* :func:`byol_views` — Hummingbird's Table 8 (the BYOL recipe): two asymmetric views.
* :func:`mocov2_views` — MoCo v2's symmetric recipe (CO2).
* :func:`multicrop_views` — DINO / iBOT: two global crops plus small local crops.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms.v2 import functional as TF

from hbird.pretrain.options import config_from_options


@dataclass(frozen=True)
class ViewSpec:
    """How to draw one view.

    Attributes:
        size: output side in pixels (square).
        scale: area fraction range of the random resized crop.
        ratio: aspect ratio range of the crop.
        flip: probability of a horizontal flip.
        jitter: probability of colour jitter; brightness/contrast/saturation/hue are
            its strengths (as in ``torchvision.transforms.ColorJitter``).
        grayscale: probability of converting to grey.
        blur: probability of a Gaussian blur with sigma in ``blur_sigma``
            (kernel about a tenth of ``size``).
        solarize: probability of solarising (threshold 0.5).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 1.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0


@dataclass
class Views:
    """The views of one image: ``(3, S, S)`` tensors in [0, 1] and optional ``(h, w)`` masks."""

    views: list[torch.Tensor]
    masks: list[torch.Tensor] | None = None


ViewSampler = Callable[[torch.Tensor, torch.Generator], Views]
"""``(image (3, H, W) in [0, 1], generator) -> Views``."""


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=gen))


def _coin(gen: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=gen)) < p


def crop_box(
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random resized crop (torchvision's sampling rule)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(gen, *scale)
        aspect = math.exp(_uniform(gen, *log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            return top, left, h, w
    # fallback: a centre crop with the aspect ratio clamped into range
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def colour_jitter(image: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """``ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)`` in random order."""
    ops = []
    if spec.brightness > 0:
        f = _uniform(gen, max(0.0, 1 - spec.brightness), 1 + spec.brightness)
        ops.append(lambda x, f=f: TF.adjust_brightness(x, f))
    if spec.contrast > 0:
        f = _uniform(gen, max(0.0, 1 - spec.contrast), 1 + spec.contrast)
        ops.append(lambda x, f=f: TF.adjust_contrast(x, f))
    if spec.saturation > 0:
        f = _uniform(gen, max(0.0, 1 - spec.saturation), 1 + spec.saturation)
        ops.append(lambda x, f=f: TF.adjust_saturation(x, f))
    if spec.hue > 0:
        f = _uniform(gen, -spec.hue, spec.hue)
        ops.append(lambda x, f=f: TF.adjust_hue(x, f))
    for i in torch.randperm(len(ops), generator=gen).tolist():
        image = ops[i](image)
    return image


def blur_kernel(height: int, width: int) -> int:
    """Gaussian-blur kernel side: about a tenth of the shorter side, odd, at least 3."""
    return max(3, (min(height, width) // 10) | 1)


def augment_view(image: torch.Tensor, spec: ViewSpec, gen: torch.Generator) -> torch.Tensor:
    """``(3, H, W)`` in [0, 1] → one ``(3, size, size)`` view in [0, 1]."""
    top, left, h, w = crop_box(image.shape[-2], image.shape[-1], spec.scale, spec.ratio, gen)
    x = TF.resized_crop(image, top, left, h, w, [spec.size, spec.size], antialias=True)
    if _coin(gen, spec.flip):
        x = TF.horizontal_flip(x)
    if _coin(gen, spec.jitter):
        x = colour_jitter(x, spec, gen)
    if _coin(gen, spec.grayscale):
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if _coin(gen, spec.blur):
        sigma = _uniform(gen, *spec.blur_sigma)
        kernel = blur_kernel(spec.size, spec.size)
        x = TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])
    if _coin(gen, spec.solarize):
        x = TF.solarize(x, 0.5)
    return x.clamp(0.0, 1.0)


class MultiView:
    """Draw one view per spec; optionally a patch mask for each of the first views.

    Args:
        specs: one :class:`ViewSpec` per view.
        masker: ``generator -> (h, w) bool`` mask drawer (iBOT), applied to the first
            ``masked_views`` views.
    """

    def __init__(
        self,
        specs: Sequence[ViewSpec],
        masker: Callable[[torch.Generator], torch.Tensor] | None = None,
        masked_views: int = 0,
    ) -> None:
        if not specs:
            raise ValueError("at least one view spec is needed")
        self.specs = tuple(specs)
        self.masker = masker
        self.masked_views = masked_views if masker is not None else 0

    def with_options(self, options: Mapping[str, Any]) -> MultiView:
        """A copy with ``options`` (``ViewSpec`` fields, e.g. ``{"hue": 0}``) set in every view."""
        if not options:
            return self
        specs = [
            config_from_options(ViewSpec, {**dataclasses.asdict(s), **options}) for s in self.specs
        ]
        return MultiView(specs, self.masker, self.masked_views)

    def __call__(self, image: torch.Tensor, gen: torch.Generator) -> Views:
        views = [augment_view(image, spec, gen) for spec in self.specs]
        masks = None
        if self.masker is not None:
            masks = [self.masker(gen) for _ in range(self.masked_views)]
        return Views(views, masks)


def byol_views(size: int, min_scale: float | None = None) -> MultiView:
    """Table 8 of Hummingbird (BYOL's recipe): view 1 always blurred, view 2 rarely
    blurred and sometimes solarised; both cropped over (0.08, 1) of the area."""
    scale = (min_scale if min_scale is not None else 0.08, 1.0)
    return MultiView(
        [
            ViewSpec(size, scale=scale, blur=1.0, solarize=0.0),
            ViewSpec(size, scale=scale, blur=0.1, solarize=0.2),
        ]
    )


def mocov2_views(size: int, min_scale: float | None = None) -> MultiView:
    """MoCo v2: two symmetric views, crops over (0.2, 1), saturation 0.4, blur p = 0.5."""
    spec = ViewSpec(
        size,
        scale=(min_scale if min_scale is not None else 0.2, 1.0),
        saturation=0.4,
        blur=0.5,
    )
    return MultiView([spec, spec])


def multicrop_views(
    size: int,
    local_crops: int = 10,
    local_size: int | None = None,
    global_scale: tuple[float, float] = (0.14, 1.0),
    local_scale: tuple[float, float] = (0.05, 0.4),
    masker: Callable[[torch.Generator], torch.Tensor] | None = None,
) -> MultiView:
    """DINO / iBOT multi-crop: two asymmetric global crops and ``local_crops`` small ones.

    ``local_size`` defaults to 96/224 of ``size``. The masker (iBOT) masks both globals.
    """
    local_size = local_size or max(8, int(round(size * 96 / 224)))
    specs = [
        ViewSpec(size, scale=global_scale, blur=1.0, solarize=0.0),
        ViewSpec(size, scale=global_scale, blur=0.1, solarize=0.2),
    ]
    specs += [ViewSpec(local_size, scale=local_scale, blur=0.5)] * local_crops
    return MultiView(specs, masker=masker, masked_views=2)
