import numpy as np
import pytest
import torch
from PIL import Image

from hbird.errors import InputError
from hbird.io.images import (
    depth_to_png_array,
    load_depth,
    load_mask,
    save_depth_png,
    save_label_png,
    voc_palette,
)
from hbird.viz.palette import IGNORE_COLOR, colorize_mask


def reference_voc_colour(i: int) -> tuple[int, int, int]:
    """Straight from the definition, one bit at a time."""
    r = g = b = 0
    c = i
    for j in range(8):
        r |= ((c >> 0) & 1) << (7 - j)
        g |= ((c >> 1) & 1) << (7 - j)
        b |= ((c >> 2) & 1) << (7 - j)
        c >>= 3
    return r, g, b


def test_voc_palette_known_values():
    p = voc_palette()
    assert p.shape == (256, 3) and p.dtype == np.uint8
    assert tuple(p[0]) == (0, 0, 0)
    assert tuple(p[1]) == (128, 0, 0)
    assert tuple(p[2]) == (0, 128, 0)
    assert tuple(p[15]) == (192, 128, 128)
    assert tuple(p[255]) == (224, 224, 192)


def test_voc_palette_matches_bitwise_definition():
    p = voc_palette(600)
    assert all(tuple(p[i]) == reference_voc_colour(i) for i in range(600))
    assert len({tuple(c) for c in p}) == 600  # every id its own colour
    assert np.array_equal(voc_palette(21), p[:21])


def test_colorize_mask_maps_ids_and_ignore():
    mask = torch.tensor([[0, 1, 2], [15, 255, 300]])
    out = colorize_mask(mask)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    p = voc_palette(301)
    assert tuple(out[0, 1]) == (128, 0, 0) and tuple(out[1, 0]) == (192, 128, 128)
    assert tuple(out[1, 1]) == IGNORE_COLOR
    assert tuple(out[1, 2]) == tuple(p[300])
    no_ignore = colorize_mask(np.array([[255]]), ignore_index=None)
    assert tuple(no_ignore[0, 0]) == (224, 224, 192)
    custom = colorize_mask(np.array([[0, 1]]), palette=np.array([[1, 2, 3], [4, 5, 6]]))
    assert custom.tolist() == [[[1, 2, 3], [4, 5, 6]]]


def test_colorize_mask_rejects_bad_masks():
    with pytest.raises(InputError, match="negative class id -1"):
        colorize_mask(np.array([[0, -1]]))
    assert tuple(colorize_mask(np.array([[-1]]), ignore_index=-1)[0, 0]) == IGNORE_COLOR
    with pytest.raises(InputError, match="2-D"):
        colorize_mask(np.zeros((2, 2, 2), dtype=np.int64))
    with pytest.raises(InputError, match="only 2 colours"):
        colorize_mask(np.array([[2]]), palette=voc_palette(2))


def test_label_png_round_trip_keeps_ids(tmp_path):
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 21, size=(17, 23))
    mask[0, :5] = 255
    path = save_label_png(tmp_path / "sub" / "m.png", torch.from_numpy(mask))
    img = Image.open(path)
    assert img.mode == "P"
    assert img.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    assert np.array_equal(load_mask(path).numpy(), mask)


def test_label_png_refuses_ids_beyond_255(tmp_path):
    with pytest.raises(InputError, match=r"class id 256.*\.npy"):
        save_label_png(tmp_path / "m.png", np.array([[0, 256]]))
    with pytest.raises(InputError, match="class id -3"):
        save_label_png(tmp_path / "m.png", np.array([[0, -3]]))
    assert not (tmp_path / "m.png").exists()


def test_depth_png_round_trip_in_millimetres(tmp_path):
    rng = np.random.default_rng(1)
    depth = rng.uniform(0.3, 12.0, size=(9, 11)).astype(np.float32)
    depth[0, 0], depth[0, 1], depth[0, 2], depth[0, 3] = 0.0, np.nan, -1.0, np.inf
    depth[1, 0], depth[1, 1] = 80.0, 0.0001
    path = save_depth_png(tmp_path / "d.png", depth)
    img = Image.open(path)
    assert img.mode.startswith("I;16")
    back = load_depth(path).numpy()
    assert back.dtype == np.float32
    assert back[0, :4].tolist() == [0.0, 0.0, 0.0, 0.0]  # invalid → 0
    assert back[1, 0] == pytest.approx(65.535)  # clipped
    assert back[1, 1] == pytest.approx(0.001)  # a valid depth never becomes invalid 0
    ok = np.ones_like(depth, dtype=bool)
    ok[0, :4] = ok[1, :2] = False
    assert np.abs(back[ok] - depth[ok]).max() <= 0.0005 + 1e-6
    assert depth_to_png_array(depth).dtype == np.uint16


def test_depth_png_rejects_wrong_shape(tmp_path):
    with pytest.raises(InputError, match=r"d\.png.*\(H, W\)"):
        save_depth_png(tmp_path / "d.png", np.ones((2, 2, 2)))
