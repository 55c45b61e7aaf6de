"""Prompt augmentation epochs (Balazevic et al. 2023, appendix A.1 and Table 7).

Each augmentation epoch passes every prompt image through a random scale-and-crop
(scale factor in [0.5, 2.0] of the encoder's input size, then a random crop back to
that size, padding with *invalid* labels where the scaled image is smaller) and colour
jitter (brightness, contrast, saturation and hue, each applied with probability 0.5
and strength at most 0.1). Image and label get the same geometry; labels are resampled
by nearest neighbour. Randomness comes from a generator seeded by
``(seed, epoch, image index)`` so a memory is reproducible and resumable image by image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF

from hbird.data.transforms import encoder_size, resize_image, resize_label
from hbird.io.seeds import make_generator
from hbird.labelspec import LabelSpec


def image_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of prompt image ``index`` in ``epoch``: a function of those and ``seed``
    only (:func:`hbird.io.seeds.derive_seed` of ``(seed, "prompt", epoch, index)``)."""
    return make_generator(seed, "prompt", epoch, index)


def invalid_fill(spec: LabelSpec) -> float:
    """Label value written where an augmented image was padded."""
    if spec.task == "segmentation":
        if spec.ignore_index is None:
            raise ValueError("padding a segmentation label needs an ignore_index")
        return float(spec.ignore_index)
    return math.nan


def crop_or_pad(
    image: torch.Tensor,
    label: torch.Tensor,
    size: tuple[int, int],
    fill: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random ``size`` window of ``(3, H, W)`` image and ``(H, W[, C])`` label, the same
    for both; where the image is smaller it is placed at a random offset on a black
    canvas and the label is padded with ``fill``."""
    out_h, out_w = size
    canvas = torch.zeros(3, out_h, out_w, dtype=image.dtype)
    target = torch.full((out_h, out_w, *label.shape[2:]), fill, dtype=torch.float64)
    h, w = image.shape[-2:]
    top = int(torch.randint(0, max(h - out_h, 0) + 1, (), generator=generator))
    left = int(torch.randint(0, max(w - out_w, 0) + 1, (), generator=generator))
    dst_top = int(torch.randint(0, max(out_h - h, 0) + 1, (), generator=generator))
    dst_left = int(torch.randint(0, max(out_w - w, 0) + 1, (), generator=generator))
    ch, cw = min(h, out_h), min(w, out_w)
    canvas[:, dst_top : dst_top + ch, dst_left : dst_left + cw] = image[
        :, top : top + ch, left : left + cw
    ]
    target[dst_top : dst_top + ch, dst_left : dst_left + cw] = label[
        top : top + ch, left : left + cw
    ].to(torch.float64)
    return canvas, target.to(label.dtype)


@dataclass(frozen=True)
class PromptAugmentation:
    """Table 7's prompt augmentations at the encoder input size.

    Attributes:
        image_size: short side the encoder sees.
        patch_size: the encoder's patch size (output sides are multiples of it).
        scale: range of the random rescaling factor.
        jitter: maximum strength of each colour jitter.
        jitter_p: probability of applying each colour jitter.
        resize: the encoder input's shape, ``"short-side"`` or ``"square"``
            (:func:`hbird.data.transforms.encoder_size`).
    """

    image_size: int
    patch_size: int
    scale: tuple[float, float] = (0.5, 2.0)
    jitter: float = 0.1
    jitter_p: float = 0.5
    resize: str = "short-side"

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor, spec: LabelSpec, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(3, H, W)`` image in [0, 1] and ``(H, W[, C])`` label → both at encoder size."""
        height, width = image.shape[-2:]
        out_h, out_w = encoder_size(height, width, self.image_size, self.patch_size, self.resize)
        s = self._uniform(generator, *self.scale)
        scaled = (max(1, round(out_h * s)), max(1, round(out_w * s)))
        image = resize_image(image, scaled)
        label = resize_label(label, scaled)
        image, label = crop_or_pad(image, label, (out_h, out_w), invalid_fill(spec), generator)
        return self._colour_jitter(image, generator), label

    @staticmethod
    def _uniform(generator: torch.Generator, low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def _colour_jitter(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        ops = (
            (TF.adjust_brightness, 1.0),
            (TF.adjust_contrast, 1.0),
            (TF.adjust_saturation, 1.0),
            (TF.adjust_hue, 0.0),
        )
        for op, centre in ops:
            apply = float(torch.rand((), generator=generator)) < self.jitter_p
            amount = self._uniform(generator, centre - self.jitter, centre + self.jitter)
            if apply:
                image = op(image, amount).clamp_(0.0, 1.0)
        return image
