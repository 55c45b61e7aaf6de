"""A toy world where retrieval and co-segmentation can really succeed or fail (issue 11,
Acceptance).

Scenes are 48×48: a shared textured **gray** ground (the background every scene has)
with rectangular objects of the classes ``red``, ``green``, ``blue`` and ``yellow``; each
class has its own colour (jittered per instance) and texture (stripes, checker,
vertical stripes, dots). Every draw comes from a local generator keyed by
``(seed, index)``; images are quantised to 8 bits so a written folder reads back bit for
bit.

``ToyClip`` (``toy_clip``) is the CLIP of this world: the text embedding of a prompt
points at the palette colour its words name; the image embedding is the image's
soft colour histogram; the dense embedding is that histogram over coarse
``cell × cell`` cells (8 px: a 6×6 grid), so DenseCLIP alone cannot draw object
boundaries. ``ToyEncoder`` is a patch-4 image encoder whose features are a sharp soft
colour assignment plus two texture energies per patch.

What each part of ReCo does here (``tests/test_zeroshot_reco.py::test_component_table``:
80 collection scenes, k = 24, context ``gray``, 8 held-out scenes with two objects each,
mIoU over the 5 classes):

==========================================  ========
components                                  toy mIoU
==========================================  ========
plain co-segmentation                       0.027
with context elimination                    0.877
with language guidance                      0.832
both                                        0.880
both + dense inference                      0.836
both + dense inference, official grid       0.834
DenseCLIP alone                             0.603
random reference (+ dense inference)        0.524
==========================================  ========

Plain co-segmentation seeds on the ground every scene shares (each archive holds some
images without the class), as the paper's 5.7 plain mIoU on PASCAL-Context; either
weighting moves the seeds onto the class. Dense inference costs a little here because
the toy DenseCLIP cells are coarser than the test objects.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from hbird.data.synthetic import SyntheticScene
from hbird.encoders.base import Encoder
from hbird.io.seeds import derive_seed
from hbird.zeroshot.clip.base import ClipModel

CLASSES = ("gray", "red", "green", "blue", "yellow")
"""Class 0 is the ground every scene shares; the others are objects."""
PALETTE = (
    (0.50, 0.50, 0.50),
    (0.85, 0.15, 0.15),
    (0.15, 0.75, 0.20),
    (0.15, 0.25, 0.85),
    (0.90, 0.85, 0.15),
)
TEXTURES = ("noise", "stripes", "checker", "columns", "dots")
SIZE = 48
IDENTITY_NORM = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _texture(kind: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.integers(0, 4)
    if kind == "stripes":
        return ((y + phase) // 2 % 2) * 2.0 - 1
    if kind == "checker":
        return (((y + phase) // 3 + (x + phase) // 3) % 2) * 2.0 - 1
    if kind == "columns":
        return ((x + phase) // 2 % 2) * 2.0 - 1
    if kind == "dots":
        return np.where(((y + phase) % 4 < 2) & ((x + phase) % 4 < 2), 1.0, -1.0)
    return rng.uniform(-1, 1, size=(h, w))


def make_scene(
    seed: int, index: int, objects: list[int] | None = None, sizes: tuple[int, int] = (10, 22)
) -> SyntheticScene:
    """Scene ``index``: the gray ground and one rectangle per entry of ``objects`` (class
    ids ≥ 1; default one object of class ``1 + index % 4``), sides drawn from ``sizes``."""
    rng = np.random.default_rng(derive_seed(seed, "toy-scene", index))
    objects = [1 + index % (len(CLASSES) - 1)] if objects is None else objects
    image = np.empty((SIZE, SIZE, 3))
    mask = np.zeros((SIZE, SIZE), dtype=np.int64)
    ground = _texture("noise", SIZE, SIZE, rng)
    image[:] = np.asarray(PALETTE[0]) + 0.04 * ground[..., None]
    for cls in objects:
        h, w = rng.integers(sizes[0], sizes[1] + 1, size=2)
        top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
        colour = np.clip(np.asarray(PALETTE[cls]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
        pattern = _texture(TEXTURES[cls], h, w, rng)
        image[top : top + h, left : left + w] = colour * (1 + 0.12 * pattern[..., None])
        mask[top : top + h, left : left + w] = cls
    image = np.round(np.clip(image, 0, 1) * 255) / 255
    tensor = torch.from_numpy(image.transpose(2, 0, 1).astype(np.float32))
    return SyntheticScene(tensor, torch.from_numpy(mask), torch.ones(SIZE, SIZE), len(CLASSES))


def make_scenes(n: int, seed: int = 0, start: int = 0, **options) -> list[SyntheticScene]:
    """Scenes ``start .. start + n - 1`` of the world ``seed``."""
    return [make_scene(seed, i, **options) for i in range(start, start + n)]


def _soft_colours(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1] → ``(B, P, H, W)``: softmax over palette colours of
    ``-‖x − colour‖² / temperature``."""
    palette = torch.tensor(PALETTE, dtype=x.dtype, device=x.device)  # (P, 3)
    dist = ((x[:, None] - palette[None, :, :, None, None]) ** 2).sum(2)
    return torch.softmax(-dist / temperature, dim=1)


class ToyClip(ClipModel):
    """The toy world's CLIP (``toy_clip``; see the module docstring). Identity-normalised."""

    has_dense = True

    def __init__(self, cell: int = 8, image_size: int = SIZE, temperature: float = 0.01):
        super().__init__()
        self.name, self.embed_dim, self.image_size = "toy_clip", len(PALETTE), image_size
        self.mean, self.std = IDENTITY_NORM
        self.cell, self.temperature = cell, temperature
        self.register_buffer("palette", torch.tensor(PALETTE))
        self.register_buffer("settings", torch.tensor([float(cell), temperature]))

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return _soft_colours(x, self.temperature).mean(dim=(2, 3))

    def _encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        soft = _soft_colours(x, self.temperature)
        return F.avg_pool2d(soft, self.cell, ceil_mode=True).permute(0, 2, 3, 1)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        rows = []
        for prompt in prompts:
            words = prompt.lower().replace(".", " ").split()
            hot = torch.tensor([float(name in words) for name in CLASSES])
            rows.append(hot if hot.any() else torch.ones(len(CLASSES)))
        return torch.stack(rows).to(self.palette.device)


class ToyEncoder(Encoder):
    """Patch-4 features of the toy world: sharp soft colour assignment (5) and the mean
    horizontal and vertical absolute differences (2) of each patch, ``D = 7``."""

    def __init__(self, temperature: float = 0.005, texture_weight: float = 0.25) -> None:
        super().__init__()
        self.name, self.patch_size, self.embed_dim, self.num_blocks = "toy_encoder", 4, 7, 1
        self.mean, self.std = IDENTITY_NORM
        self.temperature, self.texture_weight = temperature, texture_weight
        self.register_buffer("settings", torch.tensor([temperature, texture_weight]))

    def _forward_layers(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        p = self.patch_size
        colour = F.avg_pool2d(_soft_colours(x, self.temperature), p)
        dx = F.pad((x[..., :, 1:] - x[..., :, :-1]).abs().mean(1, keepdim=True), (0, 1))
        dy = F.pad((x[..., 1:, :] - x[..., :-1, :]).abs().mean(1, keepdim=True), (0, 0, 0, 1))
        texture = F.avg_pool2d(torch.cat([dx, dy], 1), p) * self.texture_weight / 0.1
        return [torch.cat([colour, texture], 1).permute(0, 2, 3, 1)] * len(layers)
