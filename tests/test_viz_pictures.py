import json

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data.synthetic import make_scene
from hbird.viz.colorbar import BAR_HEIGHT, TICK_LENGTH, Scale, colour_bar, format_tick, scale_ticks
from hbird.viz.depth import apply_colormap, colorize_depth, depth_range
from hbird.viz.overlay import overlay, panel, save_prediction_panel
from hbird.viz.palette import colorize_mask


def cmap_colour(name: str, t: float) -> np.ndarray:
    return np.round(np.asarray(matplotlib.colormaps[name](t)[:3]) * 255).astype(np.uint8)


# -- depth colouring -------------------------------------------------------------------------


def test_colorize_depth_ends_and_invalid_pixels():
    depth = np.array([[1.0, 2.0, 3.0, 0.0], [np.nan, -2.0, 5.0, 2.0]])
    out = colorize_depth(depth, vmin=1.0, vmax=3.0)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    assert np.array_equal(out[0, 0], cmap_colour("turbo", 0.0))
    assert np.array_equal(out[0, 2], cmap_colour("turbo", 1.0))
    assert np.array_equal(out[1, 2], out[0, 2])  # beyond vmax: end colour
    assert np.array_equal(out[0, 1], out[1, 3])
    for y, x in [(0, 3), (1, 0), (1, 1)]:
        assert out[y, x].tolist() == [0, 0, 0]
    valid = np.isfinite(depth) & (depth > 0)
    assert (out[valid].sum(-1) > 0).all()  # turbo never paints a valid depth black


def test_colorize_depth_robust_range_and_empty():
    ramp = np.linspace(1.0, 2.0, 1000).reshape(20, 50)
    ramp[0, 0] = 1000.0  # one outlier must not flatten the picture
    lo, hi = depth_range(ramp)
    assert 1.0 < lo < 1.1 and 1.9 < hi < 2.0
    out = colorize_depth(torch.from_numpy(ramp), cmap="viridis")
    assert len(np.unique(out.reshape(-1, 3), axis=0)) > 100
    assert depth_range(np.zeros((3, 3))) is None
    assert (colorize_depth(np.zeros((3, 3))) == 0).all()
    with pytest.raises(ValueError, match="unknown colour map"):
        colorize_depth(ramp, cmap="no_such_map")


def test_apply_colormap_is_monotone_in_lut_position():
    out = apply_colormap(np.linspace(0, 1, 256)[None], 0.0, 1.0, "gray")
    assert np.array_equal(out[0, :, 0], np.arange(256))


# -- overlay -----------------------------------------------------------------------------------


def test_overlay_blends_and_keeps_ignored_pixels():
    scene = make_scene(0, size=(24, 32), ignore_boundary=1)
    mask = scene.mask
    assert (mask == 255).any()
    out = overlay(scene.image, mask, alpha=0.5)
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    rgb = np.round(scene.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
    ignored = mask.numpy() == 255
    assert np.array_equal(out[ignored], rgb[ignored])
    colours = colorize_mask(mask)
    expected = np.round(0.5 * rgb.astype(np.float32) + 0.5 * colours.astype(np.float32))
    assert np.array_equal(out[~ignored], expected[~ignored].astype(np.uint8))
    assert np.array_equal(overlay(rgb, mask, alpha=0.0), rgb)  # same from (H, W, 3) uint8
    assert np.array_equal(overlay(rgb, mask, alpha=1.0)[~ignored], colours[~ignored])
    assert np.array_equal(overlay(scene.image, mask), overlay(rgb, mask.numpy()))


def test_overlay_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="does not match"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5), np.int64))
    with pytest.raises(ValueError, match="alpha"):
        overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 4), np.int64), alpha=1.5)


# -- panels ------------------------------------------------------------------------------------


def test_panel_widths_sum_and_heights_match():
    a = np.full((40, 60, 3), 200, np.uint8)
    b = np.zeros((20, 50, 3), np.uint8)  # resized to height 40 → width 100
    c = torch.rand(3, 40, 30)
    out = panel([a, b, c], ["a", "b", "c"], gap=4)
    assert isinstance(out, Image.Image) and out.mode == "RGB"
    assert out.width == 60 + 100 + 30 + 2 * 4
    title = out.height - 40
    assert 10 < title < 40
    arr = np.asarray(out)
    assert (arr[title:, 60:64] == 255).all()  # the gap is background
    assert (arr[title + 5, 64:164] == 0).all()  # b, upscaled, right after the gap
    assert (arr[:title, :60] < 128).any()  # the title is drawn


def test_panel_without_titles_and_validation():
    out = panel([np.zeros((10, 10, 3), np.uint8)] * 2, height=20, gap=0)
    assert out.size == (40, 20)
    with pytest.raises(ValueError, match="one title per image"):
        panel([np.zeros((4, 4, 3), np.uint8)], ["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        panel([], [])


def test_panel_cuts_long_titles_to_the_image():
    out = panel([np.zeros((30, 30, 3), np.uint8)] * 2, ["a very long title indeed", "b"], gap=10)
    arr = np.asarray(out)
    title = out.height - 30
    assert (arr[:title, 30:40] == 255).all()  # nothing drawn into the gap


def test_save_prediction_panel_segmentation(tmp_path):
    scene = make_scene(1, size=(48, 64))
    confidence = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    low_res_pred = scene.mask[4::8, 4::8]  # (6, 8): upsampled to the image by nearest
    path = save_prediction_panel(
        tmp_path / "out" / "p.png",
        scene.image,
        low_res_pred,
        ground_truth=scene.mask,
        confidence=confidence,
        class_names=["background", "disc", "box", "triangle"],
    )
    img = Image.open(path)
    assert img.mode == "RGB"
    tile = 160 * 64 // 48  # enlarged to min_height=160, aspect kept
    assert img.width == 4 * tile + 3 * 4
    plain = Image.open(save_prediction_panel(tmp_path / "q.png", scene.image, scene.mask))
    assert plain.width == 2 * tile + 4
    assert img.height > plain.height  # the class legend sits below


def tiles_top(arr: np.ndarray, left: int, right: int) -> int:
    """First row where columns left..right are all painted (the tiles, below the titles)."""
    return int(np.argmax((arr[:, left:right] != 255).any(-1).all(-1)))


def test_save_prediction_panel_depth(tmp_path):
    scene = make_scene(2, size=(64, 64))
    path = save_prediction_panel(
        tmp_path / "d.png", scene.image, scene.depth * 1.1, ground_truth=scene.depth, kind="depth"
    )
    img = Image.open(path)
    assert img.size[0] == 3 * 160 + 2 * 4
    arr = np.asarray(img)
    top = tiles_top(arr, 164, 324)
    gt_tile, pred_tile = arr[top : top + 160, 164:324], arr[top : top + 160, 328:488]
    assert not np.array_equal(gt_tile, pred_tile)  # one shared range shows the 10 % error
    with pytest.raises(ValueError, match="kind"):
        save_prediction_panel(tmp_path / "x.png", scene.image, scene.depth, kind="normals")
    assert not (tmp_path / "x.png").exists()


def test_depth_panel_has_a_colour_bar_in_metres_over_the_ground_truth_range(tmp_path):
    scene = make_scene(3, size=(64, 64))
    confidence = torch.rand(8, 8, generator=torch.Generator().manual_seed(1))
    path = save_prediction_panel(
        tmp_path / "d.png", scene.image, scene.depth * 0.9, scene.depth, "depth", confidence
    )
    img = Image.open(path)
    depth_scale, confidence_scale = json.loads(img.text["hbird:scales"])
    gt = scene.depth.numpy()
    lo, hi = np.percentile(gt[gt > 0], [2, 98])  # the range both depth tiles are coloured in
    assert depth_scale["label"] == "depth (m)"
    assert depth_scale["vmin"] == pytest.approx(lo) and depth_scale["vmax"] == pytest.approx(hi)
    assert confidence_scale == {
        "label": "top neighbour weight",
        "vmin": 0.0,
        "vmax": 1.0,
        "cmap": "viridis",
    }
    arr = np.asarray(img.convert("RGB"))
    bar = tiles_top(arr, 164, 324) + 160 + 4  # first row of the bars, under the tiles
    # one depth bar spans ground truth and prediction (x 164..487), the confidence bar
    # its own tile (x 492..651); each runs from its colour map's first to its last colour
    assert np.array_equal(arr[bar, 164], cmap_colour("turbo", 0.0))
    assert np.array_equal(arr[bar, 487], cmap_colour("turbo", 1.0))
    assert (arr[bar, 488:492] == 255).all()
    assert np.array_equal(arr[bar, 492], cmap_colour("viridis", 0.0))
    assert np.array_equal(arr[bar, 651], cmap_colour("viridis", 1.0))
    assert (arr[bar:, :160] == 255).all()  # nothing under the image


def test_confidence_gets_a_bar_and_plain_panels_none(tmp_path):
    scene = make_scene(1, size=(48, 64))
    conf = save_prediction_panel(
        tmp_path / "c.png", scene.image, scene.mask, scene.mask, confidence=torch.rand(6, 8)
    )
    (scale,) = json.loads(Image.open(conf).text["hbird:scales"])
    assert (scale["label"], scale["vmin"], scale["vmax"]) == ("winning class weight", 0, 1)
    plain = save_prediction_panel(tmp_path / "p.png", scene.image, scene.mask, scene.mask)
    assert "hbird:scales" not in Image.open(plain).text
    assert Image.open(conf).height > Image.open(plain).height


# -- colour bars -------------------------------------------------------------------------------


def test_scale_ticks_are_round_values_inside_the_range():
    assert scale_ticks(0.0, 1.0, 4) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert scale_ticks(2.986, 7.563, 2) == [5.0, 7.5]  # step 2.5: 4.58 m in about 2 steps
    assert scale_ticks(0.1, 0.3, 2) == [0.1, 0.2, 0.3]  # no 0.30000000000000004
    assert scale_ticks(2.0, 2.0, 3) == [2.0, 2.5, 3.0]  # empty range: shown as 2..3
    assert [format_tick(t) for t in (0.25, 2.0, 7.5, 10.0)] == ["0.25", "2", "7.5", "10"]


def test_colour_bar_columns_are_the_map_colours_and_ticks_sit_at_their_values():
    bar = np.asarray(colour_bar(Scale("depth (m)", 1.0, 5.0, "turbo"), 401))
    assert bar.shape[1] == 401
    # column x shows 1 + x / 100 metres: x=0 → t=0, x=200 → t=0.5 (LUT entry 128), x=400 → t=1
    assert np.array_equal(bar[0, 0], cmap_colour("turbo", 0.0))
    assert np.array_equal(bar[0, 200], cmap_colour("turbo", 128 / 255))
    assert np.array_equal(bar[BAR_HEIGHT - 1, 400], cmap_colour("turbo", 1.0))
    # ticks at 1, 2, 3, 4, 5 m: columns 0, 100, 200, 300, 400, dark; the rest of the row white
    tick_row = bar[BAR_HEIGHT + 1]
    dark = np.flatnonzero(tick_row.max(-1) < 128)
    assert dark.tolist() == [0, 100, 200, 300, 400]
    assert (bar[BAR_HEIGHT + TICK_LENGTH + 1 :] < 128).any()  # values and label drawn below
    with pytest.raises(ValueError, match="width >= 2"):
        colour_bar(Scale("x", 0, 1, "viridis"), 1)
