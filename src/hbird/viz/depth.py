"""Depth maps and other scalar maps as colour pictures."""

from __future__ import annotations

from typing import Any

import numpy as np

from hbird.viz._arrays import to_numpy


def _colormap(name: str):
    import matplotlib  # imported here: `import hbird.viz` stays light

    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise ValueError(
            f"unknown colour map {name!r}; use a matplotlib name such as 'turbo', 'magma_r', 'viridis'"
        ) from None


def shown_range(vmin: float, vmax: float) -> tuple[float, float]:
    """The values at the ends of a colour map: ``(vmin, vmax)``, or ``(vmin, vmin + 1)``
    when the range is empty (a constant map then takes the ``vmin`` colour)."""
    return (float(vmin), float(vmax)) if vmax > vmin else (float(vmin), float(vmin) + 1.0)


def apply_colormap(values: Any, vmin: float, vmax: float, cmap: str = "viridis") -> np.ndarray:
    """Scalars ``(H, W)`` → ``(H, W, 3)`` uint8, ``vmin``/``vmax`` at the ends of ``cmap``.

    Values outside the range take the end colours; NaN takes the ``vmin`` colour (callers
    that need another colour for invalid pixels paint over them).
    """
    v = to_numpy(values).astype(np.float64)
    vmin, vmax = shown_range(vmin, vmax)
    t = np.clip(np.nan_to_num((v - vmin) / (vmax - vmin), nan=0.0), 0.0, 1.0)
    lut = (_colormap(cmap)(np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)
    return lut[np.round(t * 255.0).astype(np.int64)]


def depth_range(
    depth: Any, percentiles: tuple[float, float] = (2.0, 98.0)
) -> tuple[float, float] | None:
    """Robust ``(vmin, vmax)`` of the valid (finite, > 0) depths, or None if none is valid."""
    d = to_numpy(depth).astype(np.float64)
    valid = d[np.isfinite(d) & (d > 0)]
    if valid.size == 0:
        return None
    lo, hi = np.percentile(valid, percentiles)
    return float(lo), float(hi)


def colorize_depth(
    depth: Any,
    vmin: float | None = None,
    vmax: float | None = None,
    cmap: str = "turbo",
    percentiles: tuple[float, float] = (2.0, 98.0),
    invalid_color: tuple[int, int, int] = (0, 0, 0),
) -> np.ndarray:
    """Depth ``(H, W)`` → ``(H, W, 3)`` uint8; near is blue, far is red with ``"turbo"``.

    Args:
        depth: metres (or any positive scalar); ``0``, negative, NaN and inf are invalid and
            drawn in ``invalid_color`` (black, which no ``turbo`` colour is).
        vmin, vmax: the depths at the ends of the colour map. Missing ends come from the
            ``percentiles`` of the valid depths, so a few outliers do not wash out the map.
            Pass the same values for a prediction and its ground truth to compare them.
        cmap: a matplotlib colour map name.
    """
    d = to_numpy(depth).astype(np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth has shape {d.shape}; expected (H, W)")
    valid = np.isfinite(d) & (d > 0)
    if vmin is None or vmax is None:
        auto = depth_range(d, percentiles) or (0.0, 1.0)
        vmin = auto[0] if vmin is None else vmin
        vmax = auto[1] if vmax is None else vmax
    out = apply_colormap(np.where(valid, d, vmin), float(vmin), float(vmax), cmap)
    out[~valid] = invalid_color
    return out
