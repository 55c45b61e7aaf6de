import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data.synthetic import make_scenes
from hbird.viz.correspondence import NEIGHBOUR_BOX, QUERY_BOX, plot_neighbours
from hbird.viz.curves import curves_figure, fraction_label, plot_curves

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def has_colour(arr: np.ndarray, rgb, tol: int = 12) -> bool:
    return bool((np.abs(arr[..., :3].astype(int) - np.array(rgb)).max(-1) <= tol).any())


def test_plot_curves_writes_a_png_with_both_series(tmp_path):
    fractions = [1 / 128, 1 / 64, 1 / 8, 1.0]
    path = plot_curves(
        tmp_path / "plots" / "eff.png",
        {
            "hummingbird": (fractions, [30.0, 40.0, 55.0, 70.0], [1.0, 2.0, 1.5, 0.5]),
            "linear": (torch.tensor(fractions), np.array([20.0, 30.0, 45.0, 65.0]), None),
            "two-tuple": (fractions, [10.0, 12.0, 14.0, 16.0]),
        },
        xlabel="fraction of training data",
        ylabel="mIoU (%)",
        title="data efficiency",
        logx=True,
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.shape == (480, 720, 3)  # 6x4 inches at 120 dpi
    assert has_colour(img, (31, 119, 180)) and has_colour(img, (255, 127, 14))  # C0 and C1 lines


def test_plot_curves_validation(tmp_path):
    with pytest.raises(ValueError, match="'a' has 2 xs, 3 ys"):
        plot_curves(tmp_path / "x.png", {"a": ([1, 2], [1, 2, 3], None)}, "x", "y")
    with pytest.raises(ValueError, match="positive x"):
        plot_curves(tmp_path / "x.png", {"a": ([0, 1], [1, 2], None)}, "x", "y", logx=True)
    with pytest.raises(ValueError, match="at least one series"):
        plot_curves(tmp_path / "x.png", {}, "x", "y")
    assert not (tmp_path / "x.png").exists()


def shown_x_labels(fig) -> list[tuple[str, float, float]]:
    """(text, left, right) in pixels of every x tick label drawn inside the axes, major or minor."""
    fig.canvas.draw()
    renderer, ax = fig.canvas.get_renderer(), fig.axes[0]
    lo, hi = ax.get_xlim()
    ticks = ax.xaxis.get_major_ticks() + ax.xaxis.get_minor_ticks()
    shown = [t for t in ticks if lo <= t.get_loc() <= hi and t.label1.get_visible()]
    boxes = [(t.label1.get_text(), t.label1.get_window_extent(renderer)) for t in shown]
    return sorted((text, box.x0, box.x1) for text, box in boxes if text)


@pytest.mark.parametrize(
    "fractions",
    [[1 / 128, 1 / 64, 1 / 32, 1 / 16, 1 / 8], [1 / 16, 1 / 8], [1 / 128, 1 / 64, 1 / 32]],
)
def test_fraction_axis_is_labelled_with_the_fractions_and_nothing_overlaps(fractions):
    fig = curves_figure(
        {"retrieval": (fractions, np.linspace(10, 50, len(fractions)), None)},
        "fraction of the prompt split",
        "mIoU",
        logx=True,
        fraction_ticks=True,
    )
    labels = sorted(shown_x_labels(fig), key=lambda label: label[1])
    expected = {1 / 128: "1/128", 1 / 64: "1/64", 1 / 32: "1/32", 1 / 16: "1/16", 1 / 8: "1/8"}
    assert [text for text, _, _ in labels] == [expected[f] for f in fractions]
    for (_, _, right), (_, left, _) in zip(labels, labels[1:]):
        assert right < left  # each label ends before the next begins


def test_fraction_label():
    assert [fraction_label(x) for x in (1 / 128, 0.375, 1.0, 0.1)] == ["1/128", "3/8", "1", "1/10"]
    assert fraction_label(1 / 3) == "1/3"
    assert fraction_label(0.123456789) == "0.123457"  # not a short fraction: plain number


def test_plot_neighbours_boxes_the_patches(tmp_path):
    query, a, b = make_scenes(3, seed=0)
    path = plot_neighbours(
        tmp_path / "nn.png",
        query.image,
        (3, 5),
        patch_size=8,
        neighbour_images=[a.image, b.image, a.image],
        neighbour_patch_yx=[(0, 0), (11, 15), (6, 7)],
        sims=torch.tensor([0.91, 0.85, 0.80]),
        height=192,
    )
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = np.asarray(Image.open(path).convert("RGB"))
    tile = 128 * 2  # 96x128 images shown 192 tall
    assert img.shape[1] == 4 * tile + 3 * 4
    title = img.shape[0] - 192
    assert 10 < title < 40
    query_tile = img[title:, :tile]
    # query patch (3, 5) spans rows 48..63, cols 80..95 at scale 2; around it a dark pixel,
    # the 2-px coloured frame, a dark pixel
    row = query_tile[56]
    assert (row[[76, 79, 96, 99]] == 0).all()
    assert all(np.array_equal(row[x], QUERY_BOX) for x in (77, 78, 97, 98))
    shown = np.asarray(
        Image.fromarray(
            (query.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        ).resize((256, 192), Image.Resampling.NEAREST)
    )
    assert np.array_equal(
        query_tile[48:64, 80:96], shown[48:64, 80:96]
    )  # the patch itself is not covered
    first = img[title:, tile + 4 : 2 * tile + 4]
    third = img[title:, 2 * tile + 8 : 3 * tile + 8]
    # boxes of border patches are kept inside the picture: all four sides show
    # patch (0, 0): rows/cols 0..15 at scale 2
    for y, x in [(0, 8), (8, 0), (8, 18), (18, 8)]:
        assert np.array_equal(first[y, x], NEIGHBOUR_BOX), (y, x)
    # patch (11, 15), the bottom-right corner: rows 176..191, cols 240..255
    for y, x in [(180, 237), (180, 254), (173, 248), (190, 248)]:
        assert np.array_equal(third[y, x], NEIGHBOUR_BOX), (y, x)
    assert not has_colour(first, QUERY_BOX, tol=0)


def test_plot_neighbours_validation(tmp_path):
    (scene,) = make_scenes(1, seed=0)
    with pytest.raises(ValueError, match=r"query patch \(row=12, col=0\) is outside the 12x16"):
        plot_neighbours(tmp_path / "x.png", scene.image, (12, 0), 8, [scene.image], [(0, 0)], [0.5])
    with pytest.raises(ValueError, match="one of each per neighbour"):
        plot_neighbours(
            tmp_path / "x.png", scene.image, (0, 0), 8, [scene.image], [(0, 0)], [0.5, 0.4]
        )
    assert not (tmp_path / "x.png").exists()
