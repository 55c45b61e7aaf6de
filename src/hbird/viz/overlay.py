"""Masks over images, and titled side-by-side panels of pictures.

``save_prediction_panel`` is the picture ``hbird predict`` writes beside each prediction
and the evaluation reports show: image | ground truth | prediction | confidence.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from hbird.io.images import save_image
from hbird.viz._arrays import as_rgb_uint8, resize_nearest, to_numpy
from hbird.viz._text import TEXT_COLOR, fit_text, font, line_height
from hbird.viz.colorbar import Scale, colour_bar
from hbird.viz.depth import apply_colormap, colorize_depth, depth_range
from hbird.viz.palette import colorize_mask, voc_palette

BACKGROUND = (255, 255, 255)
GAP = 4
DEPTH_CMAP = "turbo"
CONFIDENCE_CMAP = "viridis"
SCALES_KEY = "hbird:scales"
"""PNG text key of a panel's colour scales: JSON list of :class:`Scale` dicts."""


def overlay(
    image: Any,
    mask: Any,
    alpha: float = 0.5,
    ignore_index: int | None = 255,
    palette: np.ndarray | None = None,
) -> np.ndarray:
    """Blend class colours over an image: ``(H, W, 3)`` uint8.

    Args:
        image: ``(3, H, W)`` float in [0, 1] or ``(H, W, 3)`` uint8.
        mask: ``(H, W)`` class ids, the same size as the image.
        alpha: weight of the class colour (0 shows the image, 1 the mask).
        ignore_index: pixels with this id keep the image's own colour.
        palette: ``(K, 3)`` uint8 colours; default the VOC map.
    """
    rgb = as_rgb_uint8(image)
    ids = to_numpy(mask)
    if ids.shape != rgb.shape[:2]:
        raise ValueError(
            f"mask of shape {ids.shape} does not match the image of size {rgb.shape[:2]}; "
            "resize the mask to the image first (nearest neighbour)"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    colours = colorize_mask(ids, ignore_index=ignore_index, palette=palette).astype(np.float32)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    out = np.round(blended).astype(np.uint8)
    if ignore_index is not None:
        keep = ids == ignore_index
        out[keep] = rgb[keep]
    return out


def width_at_height(size: tuple[int, int], height: int) -> int:
    """Width of an ``(h, w)`` picture scaled to ``height`` pixels tall, aspect ratio kept."""
    return max(1, round(size[1] * height / size[0]))


def resize_to_height(image: Image.Image, height: int, resample: int) -> Image.Image:
    """``image`` scaled to ``height`` pixels tall, aspect ratio kept."""
    if image.height == height:
        return image
    return image.resize((width_at_height((image.height, image.width), height), height), resample)


def panel(
    images: Sequence[Any],
    titles: Sequence[str] | None = None,
    height: int | None = None,
    gap: int = GAP,
    resample: int = Image.Resampling.BILINEAR,
) -> Image.Image:
    """Pictures side by side, each with its title above, on a white background.

    Args:
        images: ``(H, W, 3)`` uint8 arrays (or anything ``overlay`` accepts as an image).
        titles: one per image (empty strings for none); titles that do not fit are cut.
        height: common height the images are resized to; default the first image's.
        gap: pixels between neighbouring images.
        resample: PIL filter for the resizing.

    Returns:
        An RGB PIL image ``sum(widths) + gap · (n - 1)`` wide.
    """
    if not images:
        raise ValueError("panel needs at least one image")
    titles = list(titles) if titles is not None else [""] * len(images)
    if len(titles) != len(images):
        raise ValueError(f"{len(images)} images but {len(titles)} titles; give one title per image")
    pictures = [Image.fromarray(as_rgb_uint8(img)) for img in images]
    height = height or pictures[0].height
    pictures = [resize_to_height(p, height, resample) for p in pictures]
    face = font()
    title_height = line_height(face) + 6 if any(titles) else 0
    width = sum(p.width for p in pictures) + gap * (len(pictures) - 1)
    canvas = Image.new("RGB", (width, title_height + height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for picture, title in zip(pictures, titles):
        canvas.paste(picture, (x, title_height))
        if title:
            text = fit_text(draw, title, face, picture.width)
            text_x = x + max(0, (picture.width - round(draw.textlength(text, font=face))) // 2)
            draw.text((text_x, 3), text, fill=TEXT_COLOR, font=face)
        x += picture.width + gap
    return canvas


def _stack(top: Image.Image, bottom: Image.Image, gap: int = GAP) -> Image.Image:
    """``bottom`` under ``top``, left-aligned, on the panel background."""
    canvas = Image.new(
        "RGB", (max(top.width, bottom.width), top.height + gap + bottom.height), BACKGROUND
    )
    canvas.paste(top, (0, 0))
    canvas.paste(bottom, (0, top.height + gap))
    return canvas


def class_legend(
    class_ids: Sequence[int],
    class_names: Sequence[str] | None,
    width: int,
    palette: np.ndarray | None = None,
) -> Image.Image:
    """A strip of colour swatches with class names, wrapped to ``width`` pixels."""
    palette = voc_palette(max(256, max(class_ids, default=0) + 1)) if palette is None else palette
    face = font()
    swatch, pad = 12, 6
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    entries = []
    for i in class_ids:
        name = class_names[i] if class_names is not None and i < len(class_names) else str(i)
        entries.append((i, name, swatch + 4 + round(probe.textlength(name, font=face)) + 2 * pad))
    rows, row, used = [], [], 0
    for entry in entries:
        if row and used + entry[2] > width:
            rows.append(row)
            row, used = [], 0
        row.append(entry)
        used += entry[2]
    if row:
        rows.append(row)
    line = swatch + pad
    strip = Image.new("RGB", (width, max(1, len(rows)) * line), BACKGROUND)
    draw = ImageDraw.Draw(strip)
    for r, items in enumerate(rows):
        x, y = 0, r * line + pad // 2
        for i, name, entry_width in items:
            colour = tuple(int(c) for c in palette[i])
            draw.rectangle(
                [x, y, x + swatch - 1, y + swatch - 1], fill=colour, outline=(96, 96, 96)
            )
            draw.text((x + swatch + 4, y - 2), name, fill=TEXT_COLOR, font=face)
            x += entry_width
    return strip


def _label_at(label: Any, size: tuple[int, int], what: str) -> np.ndarray:
    """A ``(h, w)`` label map as an array at the image's ``size`` (nearest neighbour)."""
    arr = to_numpy(label)
    if arr.ndim == 3 and 1 in (arr.shape[0], arr.shape[-1]):  # (1, h, w) or (h, w, 1)
        arr = arr[0] if arr.shape[0] == 1 else arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{what} has shape {arr.shape}; expected a 2-D (H, W) map")
    return resize_nearest(arr, size)


def _scale_strip(
    width: int, spans: Sequence[tuple[int, int]], scales: Sequence[Scale]
) -> Image.Image:
    """Colour bars side by side, each under the pixel columns ``(left, right)`` it explains."""
    bars = [colour_bar(scale, right - left) for (left, right), scale in zip(spans, scales)]
    strip = Image.new("RGB", (width, max(bar.height for bar in bars)), BACKGROUND)
    for (left, _), bar in zip(spans, bars):
        strip.paste(bar, (left, 0))
    return strip


def save_prediction_panel(
    path: str | Path,
    image: Any,
    prediction: Any,
    ground_truth: Any | None = None,
    kind: Literal["segmentation", "depth"] = "segmentation",
    confidence: Any | None = None,
    ignore_index: int | None = 255,
    class_names: Sequence[str] | None = None,
    alpha: float = 0.6,
    min_height: int = 160,
) -> Path:
    """Write ``image | ground truth | prediction | confidence`` as one PNG.

    Depth and confidence tiles get a colour bar underneath (depth in metres, one bar for
    ground truth and prediction, which share a range; confidence from 0 to 1). The bars'
    ranges are also stored in the PNG's text chunk ``hbird:scales`` (JSON), so a script
    can read the colours back as values.

    Args:
        path: output PNG; parent folders are created.
        image: ``(3, H, W)`` float in [0, 1] or ``(H, W, 3)`` uint8.
        prediction: ``(h, w)`` class ids (segmentation) or metres (depth); label maps at
            another size than the image are resized to it by nearest neighbour.
        ground_truth: optional ``(h, w)`` map of the same kind.
        kind: ``"segmentation"`` overlays class colours; ``"depth"`` colours depth with one
            shared range for prediction and ground truth (the 2nd-98th percentile of the
            ground truth's valid depths, else of the prediction's).
        confidence: optional ``(h, w)`` in [0, 1] (e.g. the top softmax weight), shown as a
            heat map (viridis: dark is unsure, yellow is sure).
        ignore_index: unlabelled id in segmentation maps (shown as the bare image).
        class_names: for segmentation, names for a legend of the classes shown.
        alpha: class colour weight of segmentation overlays.
        min_height: small images are enlarged to at least this height to stay readable.
    """
    if kind not in ("segmentation", "depth"):
        raise ValueError(f"kind must be 'segmentation' or 'depth', not {kind!r}")
    rgb = as_rgb_uint8(image)
    size = rgb.shape[:2]
    pred = _label_at(prediction, size, "prediction")
    truth = _label_at(ground_truth, size, "ground_truth") if ground_truth is not None else None
    pictures, titles = [rgb], ["image"]
    scales: list[tuple[Scale, int, int]] = []  # a scale and the first and last tile it keys
    legend_ids: list[int] = []
    if kind == "segmentation":
        if truth is not None:
            pictures.append(overlay(rgb, truth, alpha=alpha, ignore_index=ignore_index))
            titles.append("ground truth")
        pictures.append(overlay(rgb, pred, alpha=alpha, ignore_index=ignore_index))
        titles.append("prediction")
        if class_names is not None:
            shown = np.unique(pred) if truth is None else np.union1d(pred, truth)
            legend_ids = [int(i) for i in shown if i != ignore_index and i >= 0]
    else:
        vrange = depth_range(truth if truth is not None else pred) or (0.0, 1.0)
        if truth is not None:
            pictures.append(colorize_depth(truth, *vrange, cmap=DEPTH_CMAP))
            titles.append("ground truth")
        pictures.append(colorize_depth(pred, *vrange, cmap=DEPTH_CMAP))
        titles.append("prediction")
        scales.append((Scale("depth (m)", *vrange, DEPTH_CMAP), 1, len(pictures) - 1))
    if confidence is not None:
        conf = _label_at(confidence, size, "confidence").astype(np.float64)
        pictures.append(apply_colormap(conf, 0.0, 1.0, CONFIDENCE_CMAP))
        titles.append("confidence")
        weight = "winning class weight" if kind == "segmentation" else "top neighbour weight"
        scales.append((Scale(weight, 0.0, 1.0, CONFIDENCE_CMAP), *[len(pictures) - 1] * 2))
    height = max(size[0], min_height)
    resample = Image.Resampling.NEAREST if height % size[0] == 0 else Image.Resampling.BILINEAR
    picture = panel(pictures, titles, height=height, resample=resample, gap=GAP)
    info = PngInfo()
    if scales:
        step = width_at_height(size, height) + GAP  # every tile has the image's size
        spans = [(first * step, (last + 1) * step - GAP) for _, first, last in scales]
        picture = _stack(picture, _scale_strip(picture.width, spans, [s for s, _, _ in scales]))
        info.add_text(SCALES_KEY, json.dumps([s.to_dict() for s, _, _ in scales]))
    if legend_ids:
        picture = _stack(picture, class_legend(legend_ids, class_names, picture.width))
    return save_image(path, picture, pnginfo=info)
