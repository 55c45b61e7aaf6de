"""Pictures for people: class colours, overlays, depth maps, panels, curves, correspondences."""

from hbird.io.images import depth_to_png_array, save_depth_png, save_label_png, voc_palette
from hbird.viz.correspondence import plot_neighbours
from hbird.viz.curves import plot_curves
from hbird.viz.depth import apply_colormap, colorize_depth, depth_range
from hbird.viz.overlay import class_legend, overlay, panel, save_prediction_panel
from hbird.viz.palette import colorize_mask

__all__ = [
    "apply_colormap",
    "class_legend",
    "colorize_depth",
    "colorize_mask",
    "depth_range",
    "depth_to_png_array",
    "overlay",
    "panel",
    "plot_curves",
    "plot_neighbours",
    "save_depth_png",
    "save_label_png",
    "save_prediction_panel",
    "voc_palette",
]
