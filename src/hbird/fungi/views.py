"""The views each self-supervised loss looks at: crops and patches of images, edits of texts.

A loss turns a batch of ``B`` inputs into one or more :class:`ViewGroup` s. A group holds
``B × V`` views of equal size in *sample-major* order (the ``V`` views of sample 0, then
those of sample 1, ...), which is what lets one forward pass serve the whole batch and
the per-sample gradients be read off by reshaping to ``(B, V, ...)``.

Views depend only on the extractor seed and the input itself, never on the batch an
input arrives in: an image's DINO crop boxes are drawn from the seed and the image's own
pixels (or, with ``boxes="shared"``, once for every image), and a text's word deletions
are seeded by the text's content. So ``transform`` gives the same features for an input
whatever else is in the batch.

Every image is first brought to one square *canvas* (:func:`square_images`); the losses
cut their views from it. With ``resize="square"`` (FUNGI's code: the KL view is
``Resize((256, 256))`` then ``CenterCrop(224)``) the canvas is the whole image resized to
``256/224`` of the input side, the KL view and the embedding are its central input-size
square, SimCLR resizes the whole canvas to the input side, and DINO crops the canvas.
With ``resize="short-side"`` (the ``fast`` preset) the canvas is the short side resized
to the input side and centre-cropped: every view starts from the same input-size square.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from hbird.io.seeds import content_key, derive_seed, make_generator

Views = torch.Tensor | list[str]


@dataclass(frozen=True)
class ViewGroup:
    """``B × views_per_sample`` views of equal size, sample-major.

    Attributes:
        views: ``(B·V, 3, h, w)`` images in [0, 1], or ``B·V`` strings.
        views_per_sample: ``V``.
    """

    views: Views
    views_per_sample: int


# -- images -------------------------------------------------------------------------------


def snap_to_patch(size: float, patch_size: int) -> int:
    """``size`` rounded to the nearest multiple of ``patch_size`` (at least one patch)."""
    return max(patch_size, int(round(size / patch_size)) * patch_size)


RESIZES = ("square", "short-side")
CANVAS_RATIO = 256 / 224
"""Canvas side over input side for ``resize="square"`` (FUNGI's KL view: 256 → 224)."""


def canvas_side(size: int, resize: str) -> int:
    """Side of the canvas ``square_images`` makes for input side ``size``."""
    if resize not in RESIZES:
        raise ValueError(f"resize must be one of {', '.join(RESIZES)}, got {resize!r}")
    return int(round(size * CANVAS_RATIO)) if resize == "square" else size


def square_images(
    images: Sequence[torch.Tensor], size: int, resize: str = "short-side"
) -> torch.Tensor:
    """Images ``(3, H, W)`` in [0, 1] → canvases ``(B, 3, C, C)``, ``C = canvas_side(size, resize)``.

    ``"short-side"``: the short side resized to ``size``, centre crop (``C = size``).
    ``"square"``: both sides resized to ``C = round(size · 256/224)``, aspect not kept
    (FUNGI's code). Bilinear with antialiasing (torchvision v2).
    """
    side = canvas_side(size, resize)
    out = []
    for i, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image)
            raise ValueError(f"image {i} must be a (3, H, W) tensor in [0, 1], got {shape}")
        if not image.is_floating_point():
            raise ValueError(
                f"image {i} has dtype {image.dtype}; pass float images in [0, 1] "
                "(e.g. image.float() / 255)"
            )
        if resize == "square":
            out.append(TF.resize(image, [side, side], antialias=True))
        else:
            resized = TF.resize(image, [side], antialias=True)
            out.append(TF.center_crop(resized, [side, side]))
    return torch.stack(out)


def center_square(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The central ``size × size`` of canvases ``(B, 3, C, C)`` → ``(B, 3, size, size)``."""
    return batch if batch.shape[-1] == size else TF.center_crop(batch, [size, size])


def resize_views(views: torch.Tensor, size: int, interpolation: str) -> torch.Tensor:
    """``(N, 3, h, w)`` → ``(N, 3, size, size)``, antialiased (a no-op at that size already)."""
    if views.shape[-2:] == (size, size):
        return views
    return TF.resize(
        views, [size, size], interpolation=INTERPOLATIONS[interpolation], antialias=True
    )


INTERPOLATIONS = {
    "bilinear": TF.InterpolationMode.BILINEAR,
    "bicubic": TF.InterpolationMode.BICUBIC,
}


def image_key(image: torch.Tensor) -> str:
    """A short stable key for an image's pixels (seeds its own crop boxes)."""
    data = image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:16]


@dataclass(frozen=True)
class CropBox:
    """A crop of a square image in pixels: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


def sample_crop_box(
    side: int,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
    attempts: int = 10,
) -> CropBox:
    """A random-resized-crop box on a ``side × side`` image.

    The area is a uniform fraction ``scale`` of the image and the aspect ratio is
    log-uniform in ``ratio`` (the Inception-style crop DINO uses); after ``attempts``
    misses it falls back to the largest centred crop within ``ratio``.
    """
    area = side * side
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        u = torch.rand(4, generator=gen, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_lo + (log_hi - log_lo) * u[1])
        width = int(round(math.sqrt(target * aspect)))
        height = int(round(math.sqrt(target / aspect)))
        if 0 < width <= side and 0 < height <= side:
            top = min(int(u[2] * (side - height + 1)), side - height)
            left = min(int(u[3] * (side - width + 1)), side - width)
            return CropBox(top, left, height, width)
    return CropBox(0, 0, side, side)


BoxSource = str | Sequence[CropBox] | Callable[[torch.Tensor], Sequence[CropBox]]
"""``"per-image"``, ``"shared"``, fixed boxes, or a function of the canvas giving them."""


class MultiCrop:
    """DINO's multi-crop: ``num_global`` large and ``num_local`` small random resized crops.

    Args:
        image_size: side ``C`` of the square canvases the crops are cut from.
        global_size, local_size: output sides of the global and local crops.
        num_global, num_local: how many of each (FUNGI Table 17: 2 and 10).
        global_scale, local_scale: area fractions (Table 17: 0.25–1 and 0.05–0.25).
        seed: the crop seed.
        boxes: where the boxes come from. ``"per-image"``: drawn for each image from
            ``seed`` and the image's pixels (FUNGI's code draws a ``RandomResizedCrop``
            per image); ``"shared"``: drawn once from ``seed`` and used for every image;
            a sequence of ``num_global + num_local`` :class:`CropBox` es (global ones
            first, ``[top, left, height, width]`` lists also do) used for every image;
            or a function of one canvas ``(3, C, C)`` returning such a sequence.
        interpolation: ``"bicubic"`` (FUNGI's code) or ``"bilinear"``, antialiased.
    """

    def __init__(
        self,
        image_size: int,
        global_size: int,
        local_size: int,
        num_global: int = 2,
        num_local: int = 10,
        global_scale: tuple[float, float] = (0.25, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.25),
        seed: int = 0,
        boxes: BoxSource = "per-image",
        interpolation: str = "bicubic",
    ) -> None:
        if num_global < 1:
            raise ValueError(f"DINO needs at least one global crop, got num_global={num_global}")
        for name, (lo, hi) in (("global_scale", global_scale), ("local_scale", local_scale)):
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {(lo, hi)}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.image_size = image_size
        self.global_size = global_size
        self.local_size = local_size
        self.num_global, self.num_local = num_global, num_local
        self.scales = (tuple(global_scale), tuple(local_scale))
        self.seed = seed
        self.interpolation = interpolation
        self.boxes = boxes
        if isinstance(boxes, str):
            if boxes not in ("per-image", "shared"):
                raise ValueError(
                    f"boxes must be 'per-image', 'shared', a list of crop boxes or a function, "
                    f"got {boxes!r}"
                )
            shared = boxes == "shared"
            gen = make_generator(seed, "views", "multicrop", image_size)
            self.shared = self.draw(gen) if shared else None
        elif callable(boxes):
            self.shared = None
        else:
            self.shared = self._checked(boxes)

    def draw(self, gen: torch.Generator) -> list[CropBox]:
        """``num_global`` then ``num_local`` boxes drawn from ``gen``."""
        side, (global_scale, local_scale) = self.image_size, self.scales
        return [sample_crop_box(side, global_scale, gen) for _ in range(self.num_global)] + [
            sample_crop_box(side, local_scale, gen) for _ in range(self.num_local)
        ]

    def _checked(self, boxes: Sequence[CropBox | Sequence[int]]) -> list[CropBox]:
        """``boxes`` as :class:`CropBox` es, refused unless they are as many as the crops
        and fit the canvas."""
        boxes = [b if isinstance(b, CropBox) else CropBox(*(int(v) for v in b)) for b in boxes]
        if len(boxes) != self.num_global + self.num_local:
            raise ValueError(
                f"DINO needs {self.num_global} global + {self.num_local} local crop boxes, "
                f"got {len(boxes)}"
            )
        side = self.image_size
        for b in boxes:
            if not (
                0 <= b.top
                and 0 <= b.left
                and 0 < b.height
                and 0 < b.width
                and b.top + b.height <= side
                and b.left + b.width <= side
            ):
                raise ValueError(f"crop box {b} does not fit the {side}×{side} canvas")
        return boxes

    def boxes_for(self, image: torch.Tensor) -> list[CropBox]:
        """The crop boxes of one canvas ``(3, C, C)``: global ones, then local ones."""
        if self.boxes == "per-image":
            return self.draw(
                make_generator(self.seed, "views", "multicrop", self.image_size, image_key(image))
            )
        if self.shared is not None:
            return self.shared
        return self._checked(self.boxes(image))

    def _crops(self, images: torch.Tensor, boxes: list[CropBox], size: int) -> torch.Tensor:
        """``(B, 3, C, C)`` → ``(B, n, 3, size, size)``."""
        mode = INTERPOLATIONS[self.interpolation]
        crops = [
            TF.resized_crop(
                images, b.top, b.left, b.height, b.width, [size, size], mode, antialias=True
            )
            for b in boxes
        ]
        return torch.stack(crops, dim=1)

    def __call__(self, batch: torch.Tensor) -> list[ViewGroup]:
        """``(B, 3, C, C)`` → global group ``(B·n_g, 3, g, g)`` and local group ``(B·n_l, 3, l, l)``."""
        n = self.num_global
        if self.shared is not None:
            boxes = [self.shared]
            images = [batch]
        else:
            images = [image[None] for image in batch]
            boxes = [self.boxes_for(image[0]) for image in images]
        groups = [(slice(0, n), self.global_size), (slice(n, None), self.local_size)]
        out = []
        for part, size in groups:
            if not boxes[0][part]:
                continue
            views = torch.cat([self._crops(x, b[part], size) for x, b in zip(images, boxes)])
            out.append(ViewGroup(views.flatten(0, 1), len(boxes[0][part])))
        return out


GRIDS = ("unfold", "spread")


class PatchGrid:
    """Overlapping square patches on a regular grid (FUNGI's SimCLR views).

    FUNGI (appendix B.1): the image resized to 224 × 224, 49 patches of 112 × 112 with a
    stride of 1/6 of the patch; FUNGI's code takes them with ``Tensor.unfold`` at stride
    ``int(112 / 6) = 18`` (offsets 0, 18, ..., 108) and resizes each patch to 224 × 224,
    bicubic.

    Args:
        image_size: side ``S`` of the square images.
        patch: side of a patch in pixels.
        stride_fraction: stride as a fraction of ``patch``.
        grid: both grids have ``n = round((S - patch) / (patch · stride_fraction)) + 1``
            offsets per side (7 for the paper's 1/2 and 1/6: 49 patches at any ``S``).
            ``"unfold"``: ``0, s, ..., (n - 1)·s`` with ``s = int(patch · stride_fraction)``
            (FUNGI's code, which at 224 is exactly ``Tensor.unfold``'s grid);
            ``"spread"``: spread evenly from 0 to ``S - patch``.
        view_size: side the patches are resized to before the encoder (``None``: kept).
        interpolation: ``"bicubic"`` (FUNGI's code) or ``"bilinear"``, antialiased.
    """

    def __init__(
        self,
        image_size: int,
        patch: int,
        stride_fraction: float = 1.0 / 6.0,
        grid: str = "unfold",
        view_size: int | None = None,
        interpolation: str = "bicubic",
    ) -> None:
        if not 0 < patch <= image_size:
            raise ValueError(f"patch side {patch} must be in 1..{image_size} (the image side)")
        if not 0.0 < stride_fraction <= 1.0:
            raise ValueError(f"stride_fraction must be in (0, 1], got {stride_fraction}")
        if grid not in GRIDS:
            raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {grid!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.patch = patch
        self.view_size = view_size or patch
        self.interpolation = interpolation
        per_side = int(round((image_size - patch) / (patch * stride_fraction))) + 1
        if grid == "unfold":
            stride = max(1, int(patch * stride_fraction))
            self.offsets = [k * stride for k in range(per_side)]
        else:
            spread = np.linspace(0, image_size - patch, per_side)
            self.offsets = sorted({int(round(o)) for o in spread})

    @property
    def num_patches(self) -> int:
        return len(self.offsets) ** 2

    def __call__(self, batch: torch.Tensor) -> list[ViewGroup]:
        """``(B, 3, S, S)`` → one group ``(B·P, 3, v, v)``, patches in row-major grid order."""
        p = self.patch
        patches = [batch[:, :, y : y + p, x : x + p] for y in self.offsets for x in self.offsets]
        views = torch.stack(patches, dim=1).flatten(0, 1)
        return [
            ViewGroup(resize_views(views, self.view_size, self.interpolation), self.num_patches)
        ]


# -- texts --------------------------------------------------------------------------------


class WordDeletion:
    """``num_views`` copies of each text with every word deleted with probability ``p``.

    Words are whitespace-separated; at least one word is always kept. Deletions are
    seeded by the extractor seed and the text itself.
    """

    def __init__(self, num_views: int = 8, p: float = 0.1, seed: int = 0) -> None:
        if num_views < 2:
            raise ValueError(f"a contrastive loss needs at least 2 views, got {num_views}")
        if not 0.0 <= p < 1.0:
            raise ValueError(f"word deletion probability must be in [0, 1), got {p}")
        self.num_views = num_views
        self.p = p
        self.seed = seed

    def edit(self, text: str) -> list[str]:
        """The ``num_views`` edited copies of one text."""
        words = text.split()
        rng = np.random.default_rng(derive_seed(self.seed, "views", "words", content_key(text)))
        views = []
        for _ in range(self.num_views):
            keep = rng.random(len(words)) >= self.p
            if words and not keep.any():
                keep[rng.integers(len(words))] = True
            views.append(" ".join(w for w, k in zip(words, keep) if k))
        return views

    def __call__(self, texts: Sequence[str]) -> list[ViewGroup]:
        """``B`` texts → one group of ``B·num_views`` strings, sample-major."""
        return [ViewGroup([v for text in texts for v in self.edit(text)], self.num_views)]


# -- audio --------------------------------------------------------------------------------


class NoiseShift:
    """``num_views`` noisy, time-shifted copies of each filter bank (FUNGI appendix A.2).

    For a filter bank ``c`` of ``T`` frames × ``F`` mel bins (the model's normalised
    input), each view is eq. 7, ``ĉ = c + x₁ · x₂ · noise`` with ``x₁ ~ U(0, 1)^{T×F}``,
    ``x₂ ~ U(0, 1)`` and ``noise = 1/10``, then shifted in time by ``s`` frames drawn
    from the discrete uniform ``U(−max_shift, max_shift)`` (A.2: ``U(−10, 10)``, both
    ends included). The shift is circular (``torch.roll`` along time, as in Gong et al.
    (2022)'s data loader, which A.2 follows): frame ``t`` of the view is frame
    ``(t − s) mod T`` of the noisy bank. Draws are seeded by the extractor seed and the
    filter bank itself, so a clip's views do not depend on its batch.
    """

    def __init__(
        self, num_views: int = 16, noise: float = 0.1, max_shift: int = 10, seed: int = 0
    ) -> None:
        if num_views < 1:
            raise ValueError(f"noise-and-shift needs at least 1 view per clip, got {num_views}")
        if noise < 0 or max_shift < 0:
            raise ValueError(f"noise and max_shift must be >= 0, got {noise} and {max_shift}")
        self.num_views, self.noise, self.max_shift, self.seed = num_views, noise, max_shift, seed

    def augment(self, fbank: torch.Tensor) -> torch.Tensor:
        """One filter bank ``(T, F)`` → its views ``(num_views, T, F)``."""
        gen = make_generator(self.seed, "views", "noise-shift", self.num_views, image_key(fbank))
        views = []
        for _ in range(self.num_views):
            x1 = torch.rand(fbank.shape, generator=gen, dtype=torch.float64)
            x2 = torch.rand((), generator=gen, dtype=torch.float64)
            shift = int(torch.randint(-self.max_shift, self.max_shift + 1, (), generator=gen))
            noisy = fbank + (x1 * x2 * self.noise).to(fbank)
            views.append(torch.roll(noisy, shift, dims=0))
        return torch.stack(views)

    def __call__(self, batch: torch.Tensor) -> list[ViewGroup]:
        """``(B, T, F)`` → one group ``(B·num_views, T, F)``, sample-major."""
        views = torch.cat([self.augment(fbank) for fbank in batch])
        return [ViewGroup(views, self.num_views)]
