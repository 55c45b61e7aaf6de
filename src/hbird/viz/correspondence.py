"""What retrieval found: one query patch and the prompt patches it attended to."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from hbird.io.images import save_image
from hbird.viz._arrays import as_rgb_uint8, to_numpy
from hbird.viz.overlay import panel, resize_to_height

QUERY_BOX = (255, 40, 40)
NEIGHBOUR_BOX = (255, 220, 0)


def _boxed(
    image: Any,
    patch_yx: Sequence[int],
    patch_size: int,
    height: int,
    colour: tuple[int, int, int],
    what: str,
) -> Image.Image:
    """``image`` resized to ``height`` with patch ``(row, col)`` outlined in ``colour``."""
    picture = Image.fromarray(as_rgb_uint8(image))
    row, col = (int(v) for v in patch_yx)
    rows, cols = picture.height // patch_size, picture.width // patch_size
    if not (0 <= row < rows and 0 <= col < cols):
        raise ValueError(
            f"{what} patch (row={row}, col={col}) is outside the {rows}x{cols} patch grid of a "
            f"{picture.height}x{picture.width} image with patch size {patch_size}; patch "
            "coordinates index the grid of the image the encoder saw"
        )
    scale = height / picture.height
    resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR
    picture = resize_to_height(picture, height, resample)
    line = max(2, round(height / 80))
    # a coloured frame with a dark edge on both sides (visible on any colour), just
    # outside the patch but inside the picture, so border patches show all four sides
    x0, y0 = round(col * patch_size * scale), round(row * patch_size * scale)
    x1, y1 = round((col + 1) * patch_size * scale) - 1, round((row + 1) * patch_size * scale) - 1
    draw = ImageDraw.Draw(picture)
    for pad, fill, width in ((line + 2, (0, 0, 0), line + 2), (line + 1, colour, line)):
        box = [
            max(0, x0 - pad),
            max(0, y0 - pad),
            min(picture.width - 1, x1 + pad),
            min(picture.height - 1, y1 + pad),
        ]
        draw.rectangle(box, outline=fill, width=width)
    return picture


def plot_neighbours(
    path: str | Path,
    query_image: Any,
    query_patch_yx: Sequence[int],
    patch_size: int,
    neighbour_images: Sequence[Any],
    neighbour_patch_yx: Sequence[Sequence[int]],
    sims: Any,
    height: int = 192,
) -> Path:
    """Draw a query patch and its retrieved prompt patches side by side, into a PNG.

    Args:
        path: output PNG; parent folders are created.
        query_image: the query as the encoder saw it, ``(3, H, W)`` float or ``(H, W, 3)`` uint8.
        query_patch_yx: ``(row, col)`` of the query patch in the patch grid.
        patch_size: patch side in pixels (the encoder's).
        neighbour_images: one prompt image per neighbour (the same image may repeat).
        neighbour_patch_yx: ``(row, col)`` of each neighbour patch in its image's grid.
        sims: ``(k,)`` similarity of each neighbour to the query, shown in the titles.
        height: display height of every picture.
    """
    sims = to_numpy(sims).astype(float).ravel()
    k = len(neighbour_images)
    if len(neighbour_patch_yx) != k or len(sims) != k:
        raise ValueError(
            f"got {k} neighbour images, {len(neighbour_patch_yx)} patch positions and "
            f"{len(sims)} similarities; give one of each per neighbour"
        )
    pictures = [_boxed(query_image, query_patch_yx, patch_size, height, QUERY_BOX, "query")]
    titles = ["query"]
    for rank, (img, yx, sim) in enumerate(zip(neighbour_images, neighbour_patch_yx, sims), start=1):
        pictures.append(_boxed(img, yx, patch_size, height, NEIGHBOUR_BOX, f"neighbour {rank}"))
        titles.append(f"#{rank}  sim {sim:.3f}")
    picture = panel(pictures, titles, height=height)
    return save_image(path, picture)
