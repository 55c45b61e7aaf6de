"""Colour bars: the key that reads a scalar map's colours back as values (metres, weights).

A :class:`Scale` says what the colours of a picture stand for; :func:`colour_bar` draws it
as a horizontal bar with round-valued ticks and a label such as ``depth (m)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from hbird.viz._text import TEXT_COLOR, fit_text, font, line_height
from hbird.viz.depth import apply_colormap, shown_range

BAR_HEIGHT = 12
TICK_LENGTH = 4
MIN_TICK_SPACING = 60
"""Pixels of bar per tick: a 160-pixel bar gets about three labelled values."""


@dataclass(frozen=True)
class Scale:
    """``vmin`` and ``vmax`` at the ends of the colour map ``cmap``; ``label`` names the unit."""

    label: str
    vmin: float
    vmax: float
    cmap: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scale_ticks(vmin: float, vmax: float, max_ticks: int) -> list[float]:
    """Round values in ``[vmin, vmax]`` to mark on a bar, about ``max_ticks`` of them.

    Steps are 1, 2, 2.5 or 5 times a power of ten (matplotlib's ``MaxNLocator``), so
    ``scale_ticks(0, 1, 4) == [0, 0.25, 0.5, 0.75, 1]``.
    """
    from matplotlib.ticker import MaxNLocator

    vmin, vmax = shown_range(vmin, vmax)
    locator = MaxNLocator(nbins=max(1, max_ticks), steps=[1, 2, 2.5, 5, 10])
    slack = 1e-9 * (vmax - vmin)
    return [
        round(float(t), 12)
        for t in locator.tick_values(vmin, vmax)
        if vmin - slack <= t <= vmax + slack
    ]


def format_tick(value: float) -> str:
    """``0.25 → "0.25"``, ``2.0 → "2"``: as short as the value allows."""
    return f"{round(value, 6):g}"


def colour_bar(scale: Scale, width: int) -> Image.Image:
    """``scale`` as an RGB picture ``width`` pixels wide: bar, ticks, values, label.

    Pixel column ``x`` of the bar has the colour of ``vmin + x / (width - 1) · (vmax - vmin)``
    (exactly the colour ``apply_colormap`` gives that value); ticks sit at the same columns.
    Value labels that would touch their left neighbour are left out.
    """
    if width < 2:
        raise ValueError(f"a colour bar needs width >= 2 pixels, got {width}")
    lo, hi = shown_range(scale.vmin, scale.vmax)
    face, text_h = font(), line_height(font())
    values = lo + np.arange(width) / (width - 1) * (hi - lo)
    row = apply_colormap(values[None], lo, hi, scale.cmap)  # (1, width, 3)
    height = BAR_HEIGHT + TICK_LENGTH + 2 * (text_h + 3) + 2
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(Image.fromarray(np.repeat(row, BAR_HEIGHT, axis=0)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    text_y = BAR_HEIGHT + TICK_LENGTH + 1
    last_right = -(10**9)
    for tick in scale_ticks(lo, hi, width // MIN_TICK_SPACING):
        x = round((tick - lo) / (hi - lo) * (width - 1))
        draw.line([(x, BAR_HEIGHT), (x, BAR_HEIGHT + TICK_LENGTH - 1)], fill=TEXT_COLOR)
        text = format_tick(tick)
        text_w = round(draw.textlength(text, font=face))
        left = min(max(0, x - text_w // 2), width - text_w)
        if left >= last_right + 6:
            draw.text((left, text_y), text, fill=TEXT_COLOR, font=face)
            last_right = left + text_w
    label = fit_text(draw, scale.label, face, width)
    label_x = max(0, (width - round(draw.textlength(label, font=face))) // 2)
    draw.text((label_x, text_y + text_h + 3), label, fill=TEXT_COLOR, font=face)
    return canvas
