"""ELASTIC scale-policy pictures (Wang's thesis §2.4.2, Fig. 2.6 middle).

Each image is a row of scale-policy scores ``S`` (eq. 2.5), one per Elastic block:
positive where its high-resolution branch is the more active, negative where the
low-resolution one is. The picture shows every image's scores as a heat map (images
sorted by their mean score) and, beside it, each image's scores across the blocks as thin
lines with their mean in bold.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hbird.io.files import atomic_file
from hbird.viz._arrays import to_numpy

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def scale_policy_figure(
    scores,
    stage_of_block: Sequence[int] | None = None,
    title: str = "",
    size: tuple[float, float] = (9.0, 3.6),
    dpi: int = 120,
) -> Figure:
    """Scores ``(N images, L blocks)`` as a matplotlib figure (Agg canvas, no pyplot state).

    Args:
        scores: ``(N, L)`` from :func:`hbird.nn.elastic.scale_policy_scores`.
        stage_of_block: the stage (1-based) of each block, marked on the block axis.
        title: figure title.
    """
    values = to_numpy(scores).astype(np.float64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"scores must be a non-empty (images, blocks) array, got {values.shape}")
    n, blocks = values.shape
    if stage_of_block is not None and len(stage_of_block) != blocks:
        raise ValueError(f"stage_of_block has {len(stage_of_block)} entries for {blocks} blocks")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi)
    FigureCanvasAgg(fig)
    heat, lines = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})
    order = np.argsort(values.mean(axis=1), kind="stable")
    limit = float(np.abs(values).max()) or 1.0
    image = heat.imshow(
        values[order], aspect="auto", cmap="coolwarm", vmin=-limit, vmax=limit,
        interpolation="nearest", extent=(0.5, blocks + 0.5, n, 0),
    )  # fmt: skip
    fig.colorbar(image, ax=heat, label="S (high − low)")
    heat.set_xlabel("Elastic block")
    heat.set_ylabel("image (sorted by mean S)")
    xs = np.arange(1, blocks + 1)
    for row in values:
        lines.plot(xs, row, color="0.6", linewidth=0.5, alpha=0.5)
    lines.plot(xs, values.mean(axis=0), color="C3", linewidth=2.0, marker="o", label="mean")
    lines.axhline(0.0, color="black", linewidth=0.8)
    lines.set_xlabel("Elastic block")
    lines.set_ylabel("scale policy score S")
    lines.legend(loc="best", fontsize="small")
    for ax in (heat, lines):
        ax.set_xticks(xs)
        if stage_of_block is not None:
            starts = [i for i in range(1, blocks) if stage_of_block[i] != stage_of_block[i - 1]]
            for i in starts:
                ax.axvline(i + 0.5, color="black", linewidth=0.6, linestyle="--")
    lines.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_scale_policy(path: str | Path, scores, **kwargs) -> Path:
    """:func:`scale_policy_figure` written to the PNG ``path`` (atomically)."""
    fig = scale_policy_figure(scores, **kwargs)
    path = Path(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
