"""Text on pictures: the one font every viz module draws with, and fitting text to a width."""

from __future__ import annotations

from typing import Any

from PIL import ImageDraw, ImageFont

TEXT_COLOR = (0, 0, 0)
FONT_SIZE = 14


def font(size: int = FONT_SIZE) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` (a fixed bitmap font when FreeType is missing)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def line_height(face: Any) -> int:
    """Pixels from the top of the tallest glyph to the bottom of the lowest one."""
    top, bottom = face.getbbox("Hg")[1], face.getbbox("Hg")[3]
    return bottom - min(top, 0)


def fit_text(draw: ImageDraw.ImageDraw, text: str, face: Any, width: int) -> str:
    """``text``, shortened with "..." until it fits in ``width`` pixels."""
    if draw.textlength(text, font=face) <= width:
        return text
    while text and draw.textlength(text + "...", font=face) > width:
        text = text[:-1]
    return text + "..." if text else ""
