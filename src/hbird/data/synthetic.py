"""Seeded synthetic scenes: coloured, textured shapes over a hazy ground, with depth.

Every class has its own shape, colour and texture (stripes, checkerboard, dots or
waves, with class-specific orientation and period) and its own typical distance, so
patch features of even a small random ViT tell the classes apart and retrieval can
really succeed — or fail, when an encoder or a setting is broken. Instances vary in
position, size, rotation, colour (mild jitter), texture phase and depth; pixels carry
a little noise.

Depth: the background is a ground plane, far at the top of the image (7–9 m) and near
at the bottom (3.5–4.5 m), fading into haze with distance; objects stand 1–3 m away at
a depth set by their class, with a small per-instance offset and tilt. Nearer objects
occlude farther ones.

Images are quantised to 8 bits and depths to millimetres, so a scene written with
``write_scene_folder`` reads back through ``hbird.io.images`` bit for bit.

Everything is drawn from a local ``numpy.random.Generator``; the global RNGs are never
touched. Scene ``i`` of ``make_scenes(n, seed)`` does not depend on ``n``.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hbird.io.files import write_text
from hbird.io.images import DEPTH_PNG_SCALE, save_depth_png, save_image, save_label_png

SHAPES = ("disc", "box", "triangle", "ellipse", "diamond", "hexagon", "pentagon")
CLASS_NAMES = ("background", *SHAPES)
"""Default names: class 0 is the background, class ``c >= 1`` is named after its shape."""

TEXTURES = ("stripes", "checker", "dots", "waves")

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_BACKGROUND_COLOUR = (0.52, 0.54, 0.46)  # grey-olive ground: unsaturated, unlike every class
_HAZE_COLOUR = (0.80, 0.84, 0.90)


@dataclass(frozen=True)
class SyntheticScene:
    """One scene.

    Attributes:
        image: ``(3, H, W)`` float32 in [0, 1], multiples of 1/255.
        mask: ``(H, W)`` int64 class ids (0 background, 255 for ignored boundary pixels
            when ``ignore_boundary`` was set).
        depth: ``(H, W)`` float32 metres, whole millimetres, all valid (> 0).
        num_classes: classes of the label set the scene was drawn from (background included).
    """

    image: torch.Tensor
    mask: torch.Tensor
    depth: torch.Tensor
    num_classes: int


@dataclass(frozen=True)
class ClassStyle:
    """How instances of one class look.

    Attributes:
        shape: one of ``SHAPES``.
        colour: base RGB in [0, 1].
        texture: one of ``TEXTURES``.
        angle: texture orientation in radians.
        period: texture period in pixels.
    """

    shape: str
    colour: tuple[float, float, float]
    texture: str
    angle: float
    period: float


def default_class_names(num_classes: int) -> tuple[str, ...]:
    """Names of classes ``0 .. num_classes - 1``; shapes repeat with a suffix past 7."""
    _check_num_classes(num_classes)
    names = ["background"]
    for c in range(1, num_classes):
        lap = (c - 1) // len(SHAPES)
        shape = SHAPES[(c - 1) % len(SHAPES)]
        names.append(shape if lap == 0 else f"{shape}_{lap + 1}")
    return tuple(names)


def class_style(class_id: int) -> ClassStyle:
    """The look of class ``class_id >= 1`` (independent of how many classes there are).

    Hues step by the golden ratio so consecutive classes are far apart on the colour
    wheel; texture kind, orientation and period cycle with different strides.
    """
    if class_id < 1:
        raise ValueError(f"class {class_id} has no style: class 0 is the background")
    i = class_id - 1
    hue = (i * _GOLDEN) % 1.0
    colour = colorsys.hsv_to_rgb(hue, 0.80, 0.95)
    return ClassStyle(
        shape=SHAPES[i % len(SHAPES)],
        colour=(float(colour[0]), float(colour[1]), float(colour[2])),
        texture=TEXTURES[i % len(TEXTURES)],
        angle=math.radians((i * 67.5) % 180.0),
        period=5.0 + 2.0 * ((i * 3) % 4),
    )


def class_depth(class_id: int, num_classes: int) -> float:
    """Typical distance in metres of class ``class_id >= 1``: spread evenly over 1–3 m."""
    if num_classes <= 2:
        return 2.0
    return 1.0 + 2.0 * (class_id - 1) / (num_classes - 2)


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(
            f"num_classes must be >= 2 (background plus at least one shape), got {num_classes}"
        )


# -- drawing -------------------------------------------------------------------------------


def _shape_mask(
    shape: str,
    ys: np.ndarray,
    xs: np.ndarray,
    cy: float,
    cx: float,
    radius: float,
    rng: np.random.Generator,
) -> np.ndarray:
    """Boolean ``(H, W)`` footprint of one instance of ``shape`` centred at ``(cy, cx)``."""
    theta = rng.uniform(0.0, math.pi)
    dy, dx = ys - cy, xs - cx
    u = dx * math.cos(theta) + dy * math.sin(theta)  # coordinates in the shape's frame
    v = -dx * math.sin(theta) + dy * math.cos(theta)
    if shape == "disc":
        return dx**2 + dy**2 <= radius**2
    if shape == "box":
        aspect = rng.uniform(0.6, 1.0)
        return (np.abs(u) <= radius * 0.9) & (np.abs(v) <= radius * 0.9 * aspect)
    if shape == "ellipse":
        aspect = rng.uniform(0.5, 0.7)
        return (u / radius) ** 2 + (v / (radius * aspect)) ** 2 <= 1.0
    sides = {"triangle": 3, "diamond": 4, "pentagon": 5, "hexagon": 6}[shape]
    circumradius = radius * (1.3 if sides == 3 else 1.05)  # triangles are thin: enlarge
    apothem = circumradius * math.cos(math.pi / sides)
    inside = np.ones(ys.shape, dtype=bool)
    for k in range(sides):
        phi = 2.0 * math.pi * k / sides
        inside &= u * math.cos(phi) + v * math.sin(phi) <= apothem
    return inside


def _texture(
    style: ClassStyle, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """``(H, W)`` pattern in [0, 1] for one instance (random phase, class orientation/period)."""
    p = style.period
    u = xs * math.cos(style.angle) + ys * math.sin(style.angle) + rng.uniform(0.0, p)
    v = -xs * math.sin(style.angle) + ys * math.cos(style.angle) + rng.uniform(0.0, p)
    if style.texture == "stripes":
        return np.clip(0.5 + 1.5 * np.sin(2.0 * math.pi * u / p), 0.0, 1.0)
    if style.texture == "checker":
        return ((np.floor(u / p) + np.floor(v / p)) % 2.0).astype(np.float64)
    if style.texture == "dots":
        du = (u % p) - p / 2.0
        dv = (v % p) - p / 2.0
        return (du**2 + dv**2 > (0.32 * p) ** 2).astype(np.float64)
    wobble = 0.35 * p * np.sin(2.0 * math.pi * v / (2.0 * p))
    return 0.5 + 0.5 * np.sin(2.0 * math.pi * (u + wobble) / p)


def _smooth_field(
    shape: tuple[int, int], cells: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """Low-frequency random field ``(H, W)`` in [0, 1] (bilinear upsampling of a coarse grid)."""
    coarse = torch.from_numpy(rng.uniform(0.0, 1.0, size=(1, 1, cells[0] + 1, cells[1] + 1)))
    fine = torch.nn.functional.interpolate(coarse, size=shape, mode="bilinear", align_corners=True)
    return fine[0, 0].numpy()


def _background(
    height: int, width: int, ys: np.ndarray, xs: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Ground plane: ``(H, W, 3)`` colour and ``(H, W)`` depth in metres."""
    near, far = rng.uniform(3.5, 4.5), rng.uniform(7.0, 9.0)
    tilt = rng.uniform(-0.5, 0.5)
    t = 1.0 - ys / max(height - 1, 1)  # 1 at the top (far), 0 at the bottom (near)
    depth = near + (far - near) * t + tilt * (xs / max(width - 1, 1) - 0.5)
    colour = np.asarray(_BACKGROUND_COLOUR) * (1.0 + rng.uniform(-0.06, 0.06, size=3))
    blotches = _smooth_field((height, width), (3, 4), rng)
    grain = rng.uniform(0.0, 1.0, size=(height, width))
    shade = 0.75 + 0.3 * blotches + 0.15 * (grain - 0.5)
    ground = shade[..., None] * colour
    haze = np.clip((depth - 3.0) / 8.0, 0.0, 0.8)[..., None]
    return (1.0 - haze) * ground + haze * np.asarray(_HAZE_COLOUR), depth


def _place(
    shape: str,
    ys: np.ndarray,
    xs: np.ndarray,
    object_size: tuple[float, float],
    placed: list[np.ndarray],
    max_overlap: float,
    rng: np.random.Generator,
    attempts: int = 30,
) -> np.ndarray:
    """Footprint of a new instance that overlaps the ``placed`` ones as little as allowed."""
    height, width = ys.shape
    best, best_overlap = None, math.inf
    for _ in range(attempts):
        radius = rng.uniform(*object_size) / 2.0
        margin_y, margin_x = min(radius * 0.7, height / 2.0), min(radius * 0.7, width / 2.0)
        cy = rng.uniform(margin_y, height - margin_y)
        cx = rng.uniform(margin_x, width - margin_x)
        footprint = _shape_mask(shape, ys, xs, cy, cx, radius, rng)
        area = max(int(footprint.sum()), 1)
        overlap = max(
            (
                int((footprint & other).sum()) / min(area, max(int(other.sum()), 1))
                for other in placed
            ),
            default=0.0,
        )
        if overlap <= max_overlap:
            return footprint
        if overlap < best_overlap:
            best, best_overlap = footprint, overlap
    return best


def _ignore_boundaries(mask: np.ndarray, width: int, ignore_index: int) -> np.ndarray:
    """Set pixels within ``width`` px (Chebyshev) of another class to ``ignore_index``."""
    k = 2 * width + 1
    padded = np.pad(mask, width, mode="edge")
    windows = np.lib.stride_tricks.sliding_window_view(padded, (k, k))
    boundary = windows.max(axis=(-2, -1)) != windows.min(axis=(-2, -1))
    return np.where(boundary, ignore_index, mask)


def make_scene(
    rng_or_seed: int | np.random.Generator,
    size: tuple[int, int] = (96, 128),
    num_classes: int = 4,
    num_objects: tuple[int, int] = (2, 4),
    object_size: tuple[float, float] = (24.0, 52.0),
    noise: float = 0.02,
    colour_jitter: float = 0.08,
    max_overlap: float = 0.2,
    ignore_boundary: int = 0,
    include_class: int | None = None,
) -> SyntheticScene:
    """Draw one scene.

    Args:
        rng_or_seed: a seed or a ``numpy.random.Generator`` (advanced in place).
        size: ``(H, W)`` in pixels.
        num_classes: classes including the background (class ``c`` looks like
            ``class_style(c)`` and stands ``class_depth(c, num_classes)`` metres away).
        num_objects: inclusive range of how many shapes to draw.
        object_size: range of shape diameters in pixels (clipped to the image).
        noise: standard deviation of the Gaussian pixel noise.
        colour_jitter: relative per-channel colour change of each instance.
        max_overlap: largest fraction of a shape another shape may cover (tried, not forced).
        ignore_boundary: if > 0, label pixels this close to a class boundary 255 (ignored),
            as VOC does.
        include_class: a class that must be among the shapes (used by ``make_scenes`` so
            every class appears in every run of ``num_classes - 1`` scenes).
    """
    _check_num_classes(num_classes)
    height, width = size
    if height < 8 or width < 8:
        raise ValueError(f"size must be at least 8x8 pixels, got {size}")
    if num_objects[0] < 0 or num_objects[1] < num_objects[0]:
        raise ValueError(
            f"num_objects must be an inclusive range (low, high) with 0 <= low <= high, got {num_objects}"
        )
    if include_class is not None and not 1 <= include_class < num_classes:
        raise ValueError(
            f"include_class must be a shape class in 1..{num_classes - 1}, got {include_class}"
        )
    rng = (
        rng_or_seed
        if isinstance(rng_or_seed, np.random.Generator)
        else np.random.default_rng(rng_or_seed)
    )
    biggest = min(height, width) * 0.9
    object_size = (min(object_size[0], biggest), min(object_size[1], biggest))

    ys, xs = np.meshgrid(
        np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij"
    )
    image, depth = _background(height, width, ys, xs, rng)
    mask = np.zeros((height, width), dtype=np.int64)

    count = int(rng.integers(num_objects[0], num_objects[1] + 1))
    classes = list(rng.integers(1, num_classes, size=count))
    if include_class is not None:
        classes = [include_class, *classes[1:]] if classes else [include_class]
    instances, placed = [], []
    for c in classes:
        style = class_style(int(c))
        footprint = _place(style.shape, ys, xs, object_size, placed, max_overlap, rng)
        placed.append(footprint)
        distance = class_depth(int(c), num_classes) + rng.uniform(-0.15, 0.15)
        instances.append((distance, int(c), style, footprint))

    for distance, c, style, footprint in sorted(instances, key=lambda item: -item[0]):  # far first
        colour = np.clip(
            np.asarray(style.colour) * (1.0 + rng.uniform(-colour_jitter, colour_jitter, 3)), 0, 1
        )
        pattern = _texture(style, ys, xs, rng)
        texture_rgb = (0.5 + 0.5 * pattern)[..., None] * colour
        cy, cx = ys[footprint].mean(), xs[footprint].mean()
        span = max(math.sqrt(footprint.sum() / math.pi), 1.0)
        slope_y, slope_x = rng.uniform(-0.2, 0.2, size=2)
        surface = distance + slope_y * (ys - cy) / span + slope_x * (xs - cx) / span
        image[footprint] = texture_rgb[footprint]
        depth[footprint] = surface[footprint]
        mask[footprint] = c

    image = image + rng.normal(0.0, noise, size=image.shape)
    image_u8 = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
    depth_mm = np.clip(np.round(depth * DEPTH_PNG_SCALE), 1, 65535).astype(np.uint16)
    if ignore_boundary > 0:
        mask = _ignore_boundaries(mask, ignore_boundary, ignore_index=255)
    return SyntheticScene(
        image=torch.from_numpy(image_u8).permute(2, 0, 1).float().div_(255.0).contiguous(),
        mask=torch.from_numpy(mask),
        depth=torch.from_numpy(depth_mm.astype(np.float32) / DEPTH_PNG_SCALE),
        num_classes=num_classes,
    )


def make_scenes(n: int, seed: int, num_classes: int = 4, **kwargs) -> list[SyntheticScene]:
    """``n`` scenes, deterministic for ``seed``; scene ``i`` is the same for any ``n > i``.

    Scene ``i`` always holds class ``1 + i % (num_classes - 1)``, so every class appears
    in any ``num_classes - 1`` consecutive scenes. ``kwargs`` go to ``make_scene``.
    """
    _check_num_classes(num_classes)
    children = np.random.SeedSequence(seed).spawn(n)
    return [
        make_scene(
            np.random.default_rng(child),
            num_classes=num_classes,
            include_class=1 + i % (num_classes - 1),
            **kwargs,
        )
        for i, child in enumerate(children)
    ]


def write_scene_folder(
    root: str | Path,
    scenes: Sequence[SyntheticScene],
    class_names: Sequence[str] | None = None,
    with_depth: bool = True,
    prefix: str = "scene",
) -> Path:
    """Write scenes in the project's folder format and return ``root``.

    Layout: ``images/<stem>.png`` (RGB), ``masks/<stem>.png`` (palette PNG, pixel value =
    class id), ``depth/<stem>.png`` (16-bit, millimetres; only if ``with_depth``) and
    ``classes.txt`` (one name per line), with stems ``<prefix>_0000``, ``<prefix>_0001``...

    Args:
        class_names: one name per class; default ``default_class_names(num_classes)``.
    """
    if not scenes:
        raise ValueError("write_scene_folder needs at least one scene")
    counts = {s.num_classes for s in scenes}
    if len(counts) != 1:
        raise ValueError(
            f"scenes come from different label sets (num_classes {sorted(counts)}); write them to separate folders"
        )
    num_classes = counts.pop()
    names = tuple(class_names) if class_names is not None else default_class_names(num_classes)
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for scenes with {num_classes} classes")
    if any("\n" in name or not name.strip() for name in names):
        raise ValueError("class names must be non-empty single-line strings")
    for i, scene in enumerate(scenes):  # check everything before writing anything
        top = int(scene.mask.max())
        if scene.mask.min() < 0 or (top >= num_classes and top != 255):
            raise ValueError(
                f"scene {i} has mask ids outside 0..{num_classes - 1} (and 255 for ignore)"
            )

    root = Path(root)
    folders = {"images": root / "images", "masks": root / "masks"}
    if with_depth:
        folders["depth"] = root / "depth"
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        stem = f"{prefix}_{i:04d}"
        rgb = np.round(scene.image.permute(1, 2, 0).numpy() * 255.0).astype(np.uint8)
        save_image(folders["images"] / f"{stem}.png", Image.fromarray(rgb))
        save_label_png(folders["masks"] / f"{stem}.png", scene.mask)
        if with_depth:
            save_depth_png(folders["depth"] / f"{stem}.png", scene.depth)
    write_text(root / "classes.txt", "".join(f"{name}\n" for name in names))
    return root
