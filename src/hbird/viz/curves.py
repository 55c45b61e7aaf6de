"""Line plots of evaluation curves (data efficiency, fast adaptation) as PNG files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from hbird.viz._arrays import to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Series = tuple[Sequence[float], Sequence[float], Sequence[float] | None]


def _check_series(name: str, data: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        raise ValueError(
            f"series {name!r} must be (xs, ys) or (xs, ys, yerr), got {type(data).__name__}"
        )
    xs = to_numpy(data[0]).astype(np.float64).ravel()
    ys = to_numpy(data[1]).astype(np.float64).ravel()
    yerr = None
    if len(data) == 3 and data[2] is not None:
        yerr = to_numpy(data[2]).astype(np.float64).ravel()
    if len(xs) != len(ys) or (yerr is not None and len(yerr) != len(xs)):
        lengths = f"{len(xs)} xs, {len(ys)} ys" + (
            f", {len(yerr)} yerr" if yerr is not None else ""
        )
        raise ValueError(f"series {name!r} has {lengths}; they must have the same length")
    return xs, ys, yerr


def fraction_label(x: float) -> str:
    """``0.0078125 → "1/128"``, ``0.375 → "3/8"``, ``1.0 → "1"``; other numbers as ``%g``."""
    exact = Fraction(x).limit_denominator(1 << 16)
    if abs(float(exact) - x) > 1e-9 * max(1.0, abs(x)):
        return f"{x:g}"
    return str(exact)


def curves_figure(
    series: Mapping[str, Series],
    xlabel: str,
    ylabel: str,
    title: str = "",
    logx: bool = False,
    fraction_ticks: bool = False,
    size: tuple[float, float] = (6.0, 4.0),
    dpi: int = 120,
) -> Figure:
    """Named curves, with optional error bands, as a matplotlib figure (Agg canvas).

    Args:
        series: ``{label: (xs, ys, yerr or None)}``; ``yerr`` (e.g. a std over seeds) is
            drawn as a shaded band ``ys ± yerr``.
        xlabel, ylabel, title: axis labels and title.
        logx: logarithmic x axis (for data fractions such as 1/128 .. 1).
        fraction_ticks: one x tick at each x of the data, labelled as a fraction
            (``1/128``, ``1/64``, ...), and no minor ticks.
        size, dpi: figure size in inches and resolution.

    Uses matplotlib's Agg canvas directly, so no global pyplot state or display is touched.
    """
    if not series:
        raise ValueError("plot_curves needs at least one series")
    checked = {name: _check_series(name, data) for name, data in series.items()}
    if logx and any((xs <= 0).any() for xs, _, _ in checked.values()):
        raise ValueError("logx=True needs positive x values; use logx=False or drop x <= 0")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for name, (xs, ys, yerr) in checked.items():
        order = np.argsort(xs, kind="stable")
        xs, ys = xs[order], ys[order]
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=name)
        if yerr is not None:
            yerr = yerr[order]
            ax.fill_between(
                xs, ys - yerr, ys + yerr, color=line.get_color(), alpha=0.2, linewidth=0
            )
    if logx:
        ax.set_xscale("log")
    if fraction_ticks:
        ticks = np.unique(np.concatenate([xs for xs, _, _ in checked.values()]))
        ax.set_xticks(ticks, [fraction_label(t) for t in ticks])
        ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return fig


def plot_curves(path: str | Path, series: Mapping[str, Series], *args: Any, **kwargs: Any) -> Path:
    """:func:`curves_figure` written to the PNG ``path`` (parent folders are created)."""
    fig = curves_figure(series, *args, **kwargs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
