"""The web page's pixel conversions and page model (no browser, no Gradio needed).

Expected values are hand computed: the PASCAL VOC colours of classes 0-2 are black,
(128, 0, 0) and (0, 128, 0); an overlay mixes half image, half class colour.
"""

import hashlib
import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird import _optional
from hbird.data.synthetic import make_scenes
from hbird.errors import InputError
from hbird.serve import pictures
from hbird.serve.page import (
    LOADED_ALPHA,
    ORDERS,
    PAINTED_ALPHA,
    PageModel,
    confidence_array,
    edit_scale,
    layer_from_mask,
    mask_from_layer,
    overlay_array,
)
from hbird.serve.workspace import Workspace

SETTINGS = dict(encoder="test_vit", image_size=64, k=5, index="exact", memory_size=None)


def test_mask_from_layer_reads_block_centres_nearest_colour_and_alpha():
    """A 2x2 image painted on a 4x4 canvas (scale 2): each image pixel reads canvas pixel
    (2y + 1, 2x + 1); off-centre pixels are decoys that must not matter."""
    layer = np.zeros((4, 4, 4), dtype=np.uint8)
    layer[...] = (0, 128, 0, 255)  # decoy everywhere: class 2, opaque
    layer[1, 1] = (128, 0, 0, 255)  # pixel (0, 0): exactly class 1
    layer[1, 3] = (10, 120, 5, 255)  # pixel (0, 1): an anti-aliased class 2
    layer[3, 1] = (128, 0, 0, 100)  # pixel (1, 0): too transparent -> unlabelled
    layer[3, 3] = (3, 2, 1, 200)  # pixel (1, 1): background (black), opaque enough
    assert mask_from_layer(layer, num_classes=3, scale=2).tolist() == [[1, 2], [255, 0]]


def test_layer_from_mask_round_trips_and_is_transparent_where_unlabelled():
    rng = np.random.default_rng(0)
    mask = rng.integers(0, 4, size=(5, 7)).astype(np.uint8)
    mask[rng.random((5, 7)) < 0.3] = 255
    mask[0, 0] = 3
    layer = layer_from_mask(mask, scale=3)
    assert layer.shape == (15, 21, 4)
    assert (layer[..., 3][np.repeat(np.repeat(mask == 255, 3, 0), 3, 1)] == 0).all()
    assert layer[:3, :3].reshape(9, 4).tolist() == [[128, 128, 0, LOADED_ALPHA]] * 9  # class 3
    assert PAINTED_ALPHA <= LOADED_ALPHA < 255  # painted, yet the image shows through
    assert np.array_equal(mask_from_layer(layer, num_classes=4, scale=3), mask)


def test_overlay_confidence_and_edit_scale_by_hand():
    image = np.array([[[10, 20, 30], [200, 100, 0]]], dtype=np.uint8)
    labels = np.array([[1, 0]])
    # 0.5 * 10 + 0.5 * 128 = 69; 0.5 * 200 + 0 = 100; ...
    assert overlay_array(image, labels).tolist() == [[[69, 10, 15], [100, 50, 0]]]
    assert confidence_array(np.array([0.0, 0.5, 1.2, -1.0])).tolist() == [0, 128, 255, 0]
    assert edit_scale(96, 128) == 4  # 128 * 4 = 512
    assert edit_scale(100, 30) == 6  # ceil(512 / 100)
    assert edit_scale(1000, 800) == 1


@pytest.fixture()
def workspace(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, s in enumerate(make_scenes(4, seed=3, size=(32, 48))):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
    return Workspace(folder, tmp_path / "ws", ["background", "a", "b"], SETTINGS)


def test_page_model_saves_the_painted_mask_and_orders_the_gallery(workspace):
    model = PageModel(workspace)
    s = model.scale("img0.png")
    assert s == edit_scale(32, 48) == 11
    with pytest.raises(InputError, match="nothing is painted"):
        model.save_prompt("img0.png", model.editor_value("img0.png"))
    painted = np.full((32, 48), 255, dtype=np.uint8)
    painted[:16] = 1
    painted[20:, 30:] = 0
    value = model.editor_value("img0.png")
    value["layers"] = [layer_from_mask(painted, s)]
    model.save_prompt("img0.png", value)
    assert workspace.prompt == ["img0.png"]
    assert np.array_equal(np.asarray(Image.open(workspace.mask_path("img0.png"))), painted)
    # the editor reopens a prompt image with its confirmed mask as the brush layer
    reopened = model.editor_value("img0.png")
    assert np.array_equal(mask_from_layer(reopened["layers"][0], 3, s), painted)

    items, names = model.gallery(set(), confidence=False, order=ORDERS[0])
    assert names == ["img0.png", "img1.png", "img2.png", "img3.png"]
    assert [caption for _, caption in items][:2] == ["img0.png · prompt", "img1.png"]
    assert np.array_equal(items[1][0], np.asarray(Image.open(workspace.image_path("img1.png"))))

    shown = {"img1.png", "img3.png"}
    items, names = model.gallery(shown, confidence=False, order=ORDERS[1])
    means = {n: float(workspace.predict(n).confidence.mean()) for n in shown}
    low, high = sorted(shown, key=means.get)
    assert names == [low, high, "img0.png", "img2.png"]  # predicted, least confident first
    assert items[0][1] == f"{low} · {means[low]:.2f}"
    rgb = np.asarray(Image.open(workspace.image_path(low))).astype(np.float64)
    colours = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]])[workspace.predict(low).labels.numpy()]
    assert np.abs(items[0][0] - (rgb + colours) / 2).max() <= 0.5
    grey, _ = model.gallery(shown, confidence=True, order=ORDERS[1])
    conf = workspace.predict(low).confidence.numpy()
    assert np.abs(grey[0][0] - conf * 255).max() <= 0.5

    workspace.remove_prompt("img0.png")
    items, _ = model.gallery(shown, confidence=False, order=ORDERS[1])
    assert all("·" not in caption for _, caption in items)  # an empty prompt shows no predictions


def test_missing_gradio_names_the_serve_extra(monkeypatch):
    monkeypatch.setattr(_optional, "is_available", lambda module: False)
    with pytest.raises(ImportError, match=r'pip install "hbird\[serve\]"'):
        _optional.require("gradio", "the hbird serve web page")


def test_png_bytes_is_a_single_channel_png_of_the_ids():
    from hbird.serve.page import png_bytes

    mask = np.array([[0, 1], [255, 2]], dtype=np.uint8)
    assert np.asarray(Image.open(io.BytesIO(png_bytes(mask)))).tolist() == mask.tolist()


def test_serve_without_gradio_says_how_to_get_the_page(monkeypatch, workspace, tmp_path):
    """``hbird serve`` without Gradio still serves the REST API; ``/`` names the extra."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from hbird.cli.serve import with_page
    from hbird.serve.app import create_app

    monkeypatch.setattr(_optional, "is_available", lambda module: module != "gradio")
    app = with_page(create_app(workspace.images_dir, tmp_path / "state"), demo=False)
    client = TestClient(app)
    page = client.get("/")
    assert page.status_code == 503 and 'pip install "hbird[serve]"' in page.text
    assert client.get("/api/workspaces/default").json()["classes"] == ["background", "object"]


# -- depth ---------------------------------------------------------------------------
def depth_png(depth) -> bytes:
    """A depth map as the CLI's depth folders hold it: a 16-bit PNG in millimetres."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.asarray(depth) * 1000).astype(np.uint16)).save(buffer, "PNG")
    return buffer.getvalue()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float32))
    return buffer.getvalue()


def turbo_colours(depth: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Oracle: matplotlib's 256-colour turbo table read at ``(depth - lo) / (hi - lo)``."""
    import matplotlib

    table = matplotlib.colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255
    t = np.clip((depth.astype(np.float64) - lo) / (hi - lo), 0, 1)
    return table[np.round(t * 255).astype(int)]


def test_depth_page_uploads_depth_maps_and_colour_maps_predictions(tmp_path):
    """A depth workspace on the page: depth maps uploaded as a 16-bit PNG (mm) and a .npy
    (metres) become the prompt; every picture shares one turbo scale, the 2nd-98th
    percentile of the prompt's valid depths (computed here with numpy); the predictions are
    a depth predictor's fitted on the same maps; confidence is its top neighbour weight."""
    from hbird import InContextPredictor, LabelSpec

    folder = tmp_path / "photos"
    folder.mkdir()
    scenes = make_scenes(4, seed=3, size=(32, 48))
    for i, s in enumerate(scenes):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
    ws = Workspace(folder, tmp_path / "ws", settings=SETTINGS, task="depth")
    model = PageModel(ws)
    assert model.depth_scale() is None and model.colour_bar(confidence=False) is None
    with pytest.raises(InputError, match="upload a depth map: a 16-bit PNG in millimetres"):
        model.save_depth("img0.png", None)
    depth0 = scenes[0].depth.numpy()
    with pytest.raises(InputError, match="the depth map for img0.png is 10x10 but the image is"):
        model.save_depth("img0.png", depth_png(depth0[:10, :10]))  # the CLI's message
    assert ws.prompt == []
    model.save_depth("img0.png", depth_png(depth0))
    model.save_depth("img1.png", npy(scenes[1].depth))
    assert ws.prompt == ["img0.png", "img1.png"]
    assert (
        "upload a depth map"
        in PageModel(Workspace(folder, tmp_path / "other", task="depth")).status()
    )

    prompt = [np.round(depth0 * 1000) / 1000, scenes[1].depth.numpy()]  # as uploaded
    values = np.concatenate([d.ravel() for d in prompt])
    lo, hi = np.percentile(values[values > 0], [2, 98])
    scale = model.depth_scale()
    assert (scale.vmin, scale.vmax, scale.cmap) == pytest.approx((lo, hi, "turbo"))
    assert np.abs(model.prompt_depth("img0.png") - turbo_colours(prompt[0], lo, hi)).max() <= 1
    assert model.prompt_depth("img2.png") is None

    fresh = InContextPredictor(**SETTINGS, progress=False).fit(
        [folder / "img0.png", folder / "img1.png"],
        [torch.from_numpy(d.astype(np.float32)) for d in prompt],
        label_spec=LabelSpec(task="depth", min_value=1e-3),
    )
    expected = fresh.predict_dense([folder / "img3.png"])[0]
    depth3, conf3 = expected.labels.numpy(), expected.confidence.numpy()
    assert np.abs(model.view("img3.png", False) - turbo_colours(depth3, lo, hi)).max() <= 1
    assert np.abs(model.view("img3.png", True) - conf3 * 255).max() <= 0.5
    items, names = model.gallery({"img3.png"}, confidence=False, order=ORDERS[1])
    assert names[0] == "img3.png" and items[0][1] == f"img3.png · {conf3.mean():.2f}"
    assert np.array_equal(items[0][0], model.view("img3.png", False))

    bar = model.colour_bar(confidence=False)  # row 0: the bar; its ends are lo and hi
    turbo_ends = turbo_colours(np.array([lo, hi]), lo, hi)
    assert np.abs(bar[0, [0, -1]] - turbo_ends).max() <= 1
    grey = model.colour_bar(confidence=True)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[0, -1].tolist() == [255, 255, 255]


def test_gallery_files_are_drawn_once_per_revision_and_big_pictures_shrunk(workspace, tmp_path):
    """The page's gallery sends files: pictures equal :meth:`PageModel.gallery`'s (lossless
    PNG at their size), each drawn once per workspace revision (plain images once for
    good); a picture over THUMBNAIL_SIZE is sent as a JPEG shrunk by area averaging (the
    oracle: 2 x 2 block means of a 640 px picture, by numpy)."""
    from hbird.serve import page

    model = PageModel(workspace)
    painted = np.full((32, 48), 255, dtype=np.uint8)
    painted[:16] = 1
    workspace.add_prompt("img0.png", page.png_bytes(painted))
    shown = {"img1.png", "img2.png"}
    files, names = model.gallery_files(shown, False, ORDERS[1])
    arrays, same_names = model.gallery(shown, False, ORDERS[1])
    assert names == same_names and [c for _, c in files] == [c for _, c in arrays]
    for (path, _), (picture, _) in zip(files, arrays):
        assert path.endswith(".png") and np.array_equal(np.asarray(Image.open(path)), picture)

    hashed = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path, _ in files]
    assert [Path(path).stem for path, _ in files] == hashed  # named by content

    drawn = []
    for method in ("view", "image"):
        original = getattr(model, method)
        setattr(
            model, method, lambda *a, _f=original, _m=method, **k: drawn.append(_m) or _f(*a, **k)
        )
    assert model.gallery_files(shown, False, ORDERS[1])[0] == files and drawn == []
    workspace.add_prompt("img3.png", page.png_bytes(painted))  # a new revision
    again, _ = model.gallery_files(shown, False, ORDERS[1])
    # the two predictions (each overlay reads its image), not the two plain images
    assert sorted(drawn) == ["image", "image", "view", "view"]
    plain = {path for (path, _), name in zip(files, names) if name not in shown}
    assert len(plain) == 2 and plain <= {path for path, _ in again}  # plain images: kept

    rng = np.random.default_rng(0)
    big = np.kron(rng.integers(0, 256, size=(40, 30, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    data, suffix = pictures.thumbnail(big)
    shrunk = Image.open(io.BytesIO(data))
    assert suffix == ".jpg" and shrunk.format == "JPEG" and shrunk.size == (240, 320)
    blocks = big.reshape(320, 2, 240, 2, 3).mean(axis=(1, 3))
    assert np.abs(np.asarray(shrunk).astype(float) - blocks).mean() < 3
    data, suffix = pictures.thumbnail(big[:320, :200])
    assert suffix == ".png" and np.array_equal(
        np.asarray(Image.open(io.BytesIO(data))), big[:320, :200]
    )


def test_picture_files_are_named_by_content_written_once_and_swept_after_a_grace():
    """Gradio serves a picture file with the size it stat'ed first, so a served file must
    never be rewritten in place (issue 16's h11 "Too little data for declared
    Content-Length"): a file is named by the SHA-256 of its bytes (hashlib here), adding
    the same bytes again returns it untouched (same inode and mtime), and only a file that
    no page state keeps and nobody was handed for ``grace_s`` seconds is deleted."""
    now = [100.0]
    store = pictures.PictureFiles(grace_s=10.0, clock=lambda: now[0])
    red = np.zeros((4, 6, 3), dtype=np.uint8)
    red[..., 0] = 200
    first = store.add(b"abc", ".png")
    assert (
        first.name == hashlib.sha256(b"abc").hexdigest() + ".png" and first.read_bytes() == b"abc"
    )
    before = first.stat()
    time.sleep(0.01)
    assert store.add(b"abc", ".png") == first
    after = first.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    picture = Path(store.picture(red))
    assert np.array_equal(np.asarray(Image.open(picture)), red) and store.picture(None) is None
    kept = store.add(b"kept", ".jpg")
    now[0] = 109.0
    store.hand(picture)  # handed out again at 109
    assert store.sweep(keep=[kept]) == [] and first.is_file()  # 9 s: within the grace
    now[0] = 111.0
    assert store.sweep(keep=[kept]) == [first] and not first.exists()
    assert picture.is_file() and kept.is_file()
    now[0] = 200.0
    assert store.sweep(keep=[kept]) == [picture] and kept.is_file()
    assert store.add(b"abc", ".png") == first and first.read_bytes() == b"abc"  # again
