"""Seeded synthetic panoptic scenes: a stuff ground and thing shapes, same-class ones touching.

Each scene has the hazy ground of :mod:`hbird.data.synthetic` (class 0, stuff) and
``num_objects`` instances of the thing classes ``1 .. num_things`` (drawn in those
classes' styles: shape, colour, texture). With probability ``touching``, the second
instance has the first one's class and is placed against it, overlapping its rim a
little, so the two touch along a boundary: connected components of the semantic map
merge them, and only an instance-aware method splits them again.

Instances are painted in order (a later one covers an earlier one) and numbered
1, 2, ... within their class; an instance left with no pixel is dropped.

Randomness: scene ``i`` of seed ``s`` and split ``p`` draws everything from
``numpy.random.default_rng(derive_seed(s, "panoptic-scene", p, i))``, a stream of its own
(:func:`hbird.io.seeds.derive_seed`): the scenes of :mod:`hbird.data.synthetic`, and so
the semantic ``synthetic`` dataset and ``hbird demo``, are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from hbird.data.datasets import DATASETS, DenseDataset
from hbird.data.panoptic import INSTANCE_OFFSET, PanopticMap, PanopticSample
from hbird.data.synthetic import _background, _shape_mask, _texture, class_style
from hbird.errors import InputError
from hbird.io.files import write_text
from hbird.io.images import save_id_png16, save_image
from hbird.io.seeds import derive_seed
from hbird.labelspec import LabelSpec


@dataclass(frozen=True)
class PanopticScene:
    """One scene: ``image`` ``(3, H, W)`` in [0, 1] (multiples of 1/255), ``semantic`` and
    ``instance`` ``(H, W)`` int64 (0 = ground / no instance), ``num_classes``."""

    image: torch.Tensor
    semantic: torch.Tensor
    instance: torch.Tensor
    num_classes: int

    @property
    def panoptic(self) -> PanopticMap:
        return PanopticMap(self.semantic, self.instance)


def class_names(num_things: int) -> tuple[str, ...]:
    """``("ground", <shape of class 1>, ...)``."""
    return ("ground", *(class_style(c).shape for c in range(1, num_things + 1)))


def touching_pairs(semantic: torch.Tensor, instance: torch.Tensor) -> int:
    """How many pairs of instances of one class share a 4-neighbour pixel edge."""
    pairs = set()
    for a, b in (
        ((slice(None), slice(1, None)), (slice(None), slice(None, -1))),
        ((slice(1, None), slice(None)), (slice(None, -1), slice(None))),
    ):
        same = (semantic[a] == semantic[b]) & (instance[a] > 0) & (instance[b] > 0)
        same &= instance[a] != instance[b]
        for c, i, j in zip(semantic[a][same], instance[a][same], instance[b][same]):
            pairs.add((int(c), *sorted((int(i), int(j)))))
    return len(pairs)


def _disc_params(
    rng: np.random.Generator, size: tuple[int, int], object_size: tuple[float, float]
) -> tuple[float, float, float]:
    radius = rng.uniform(*object_size) / 2.0
    cy = rng.uniform(radius * 0.8, size[0] - radius * 0.8)
    cx = rng.uniform(radius * 0.8, size[1] - radius * 0.8)
    return cy, cx, radius


def make_panoptic_scene(
    rng: np.random.Generator,
    size: tuple[int, int] = (64, 64),
    num_things: int = 3,
    num_objects: tuple[int, int] = (2, 4),
    object_size: tuple[float, float] = (16.0, 28.0),
    touching: float = 0.5,
    noise: float = 0.02,
    colour_jitter: float = 0.15,
) -> PanopticScene:
    """Draw one scene (``rng`` is advanced in place).

    Args:
        size: ``(H, W)``. num_things: thing classes (1 .. num_things; 0 is the ground).
        num_objects: inclusive range of instances per scene.
        object_size: range of instance diameters in pixels (at most 0.6 of the short side).
        touching: probability that instance 2 is instance 1's class and touches it.
        noise: Gaussian pixel noise. colour_jitter: relative colour change per instance.
    """
    height, width = size
    if num_things < 1 or num_objects[0] < 1 or num_objects[1] < num_objects[0]:
        raise ValueError("need num_things >= 1 and a range 1 <= low <= high of num_objects")
    biggest = 0.6 * min(height, width)  # clipped to the image, as hbird.data.synthetic does
    object_size = (min(object_size[0], biggest), min(object_size[1], biggest))
    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    image, _ = _background(height, width, ys, xs, rng)
    semantic = np.zeros((height, width), dtype=np.int64)
    instance = np.zeros((height, width), dtype=np.int64)
    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    classes = [int(c) for c in rng.integers(1, num_things + 1, size=count)]
    pair = count >= 2 and rng.uniform() < touching
    if pair:
        classes[1] = classes[0]
    numbers: dict[int, int] = {}
    first = None
    for k, c in enumerate(classes):
        style = class_style(c)
        cy, cx, radius = _disc_params(rng, size, object_size)
        if pair and k == 1:  # against instance 1, overlapping its rim by ~15%
            (cy0, cx0, r0), angle = first, rng.uniform(0.0, 2.0 * math.pi)
            reach = 0.85 * (r0 + radius)
            cy = float(np.clip(cy0 + reach * math.sin(angle), 0, height - 1))
            cx = float(np.clip(cx0 + reach * math.cos(angle), 0, width - 1))
        if k == 0:
            first = (cy, cx, radius)
        footprint = _shape_mask(style.shape, ys, xs, cy, cx, radius, rng)
        colour = np.clip(
            np.asarray(style.colour) * (1.0 + rng.uniform(-colour_jitter, colour_jitter, 3)), 0, 1
        )
        pattern = _texture(style, ys, xs, rng)
        image[footprint] = ((0.5 + 0.5 * pattern)[..., None] * colour)[footprint]
        numbers[c] = numbers.get(c, 0) + 1
        semantic[footprint] = c
        instance[footprint] = numbers[c]
    image = image + rng.normal(0.0, noise, size=image.shape)
    image_u8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    semantic_t, instance_t = torch.from_numpy(semantic), torch.from_numpy(instance)
    return PanopticScene(
        torch.from_numpy(image_u8).permute(2, 0, 1).float().div_(255.0).contiguous(),
        semantic_t,
        _renumber(semantic_t, instance_t),
        num_things + 1,
    )


def _renumber(semantic: torch.Tensor, instance: torch.Tensor) -> torch.Tensor:
    """Instances numbered 1, 2, ... per class in order, fully covered ones dropped."""
    out = torch.zeros_like(instance)
    for c in torch.unique(semantic[instance > 0]).tolist():
        ids = torch.unique(instance[(semantic == c) & (instance > 0)]).tolist()
        for new, old in enumerate(ids, start=1):
            out[(semantic == c) & (instance == old)] = new
    return out


def scene_rng(seed: int, index: int, split: str = "train") -> np.random.Generator:
    """The generator of scene ``index`` of ``seed`` and ``split`` (module docstring)."""
    return np.random.default_rng(derive_seed(seed, "panoptic-scene", split, index))


def make_panoptic_scenes(
    n: int, seed: int, split: str = "train", **options: Any
) -> list[PanopticScene]:
    """Scenes ``0 .. n-1`` of ``seed`` and ``split``; scene ``i`` does not depend on ``n``."""
    return [make_panoptic_scene(scene_rng(seed, i, split), **options) for i in range(n)]


def write_panoptic_folder(
    root: str | Path, scenes: Sequence[PanopticScene], prefix: str = "scene"
) -> Path:
    """Write scenes in the folder format with panoptic labels and return ``root``:
    ``images/<stem>.png``, ``panoptic/<stem>.png`` (16-bit, class · 1000 + instance) and
    ``classes.txt`` (things tagged ``[thing]``)."""
    if not scenes:
        raise ValueError("write_panoptic_folder needs at least one scene")
    root = Path(root)
    things = scenes[0].num_classes - 1
    for i, scene in enumerate(scenes):
        stem = f"{prefix}_{i:04d}"
        rgb = np.round(scene.image.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
        save_image(root / "images" / f"{stem}.png", Image.fromarray(rgb))
        save_id_png16(
            root / "panoptic" / f"{stem}.png", scene.semantic * INSTANCE_OFFSET + scene.instance
        )
    names = class_names(things)
    lines = [names[0]] + [f"{name} [thing]" for name in names[1:]]
    write_text(root / "classes.txt", "".join(f"{line}\n" for line in lines))
    return root


class SyntheticPanopticDataset(DenseDataset):
    """``synthetic_panoptic:n=64:seed=0:size=64:things=3:touching=0.5``, drawn on access.

    Args:
        n, seed: how many scenes, and the seed of the set. split: each split (``train``,
            ``val``...) is its own stream of scenes, so the protocols' prompt and query
            splits differ. size: image side in pixels.
        things: thing classes (class 0 is the ground, stuff). touching: probability
            of a touching same-class pair per scene.
        **options: further :func:`make_panoptic_scene` options (``noise``,
            ``colour_jitter``, ``num_objects``, ``object_size``).
    """

    def __init__(
        self,
        n: int = 64,
        seed: int = 0,
        split: str = "train",
        size: int = 64,
        things: int = 3,
        touching: float = 0.5,
        **options: Any,
    ) -> None:
        allowed = {"noise", "colour_jitter", "num_objects", "object_size"}
        unknown = sorted(set(options) - allowed)
        if unknown:
            raise InputError(
                f"synthetic_panoptic does not take {', '.join(unknown)}; it takes n, seed, "
                f"split, size, things, touching, {', '.join(sorted(allowed))}"
            )
        if int(n) < 1 or int(things) < 1 or not 0.0 <= float(touching) <= 1.0:
            raise InputError("synthetic_panoptic needs n >= 1, things >= 1 and 0 <= touching <= 1")
        self.seed, self.split = int(seed), str(split)
        self.options = {
            "size": (int(size), int(size)),
            "num_things": int(things),
            "touching": float(touching),
            **options,
        }
        names = class_names(int(things))
        spec = LabelSpec(
            "segmentation", num_classes=len(names), ignore_index=255, class_names=names
        )
        super().__init__(
            range(int(n)), spec, f"synthetic_panoptic(n={n}, seed={seed}, split={split})"
        )
        self.thing_classes = tuple(range(1, int(things) + 1))

    def _name(self, item: int) -> str:
        return f"panoptic_{item:05d}"

    def scene(self, index: int) -> PanopticScene:
        return make_panoptic_scene(scene_rng(self.seed, index, self.split), **self.options)

    def _load(self, item: int) -> PanopticSample:
        scene = self.scene(item)
        return PanopticSample(
            self._name(item), scene.image, scene.semantic, instance=scene.instance
        )


DATASETS.register("synthetic_panoptic", SyntheticPanopticDataset)
