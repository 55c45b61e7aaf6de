"""The page's first paint: its gallery in the HTML of ``/`` (issue 16: the first page
load under 1 s, without waiting for Gradio's client).

Through FastAPI's test client over the REST app, with a stand-in for Gradio's page (its
``<gradio-app>`` element, where the block goes); the real Gradio page is the slow test at
the end. The expected gallery is built here by hand: predicted images first by mean
confidence (least first), then the others by name; captions ``name · 0.xx`` and
`` · prompt``; a plain picture is the image file's pixels, an overlay is
``(image + VOC colour of the class) / 2`` (VOC: class 0 black, class 1 (128, 0, 0)).
"""

import html
import io
import re

import numpy as np
import pytest
from PIL import Image

from hbird._optional import is_available
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.serve.first_paint import BLOCK_ID, first_paint_html, serve_first_paint
from hbird.serve.page import PageModel
from hbird.serve.pictures import png

SETTINGS = dict(encoder="test_vit", image_size=64, k=5, index="exact", memory_size=None)
TRICKY = "a<b>&\"c'.png"  # a legal file name that must be escaped in HTML
STAND_IN = '<html><body><!--{}--><gradio-app eager="true"></gradio-app></body></html>'
FIGURE = re.compile(r'<figure><img src="([^"]+)" alt="([^"]*)"[^>]*><figcaption>([^<]*)<')
VOC = np.array([[0, 0, 0], [128, 0, 0], [0, 128, 0]])

pytestmark = pytest.mark.skipif(
    not is_available("fastapi"), reason='the REST app needs fastapi (pip install "hbird[serve]")'
)


def test_first_paint_html_escapes_captions_and_names_files_only():
    block = first_paint_html(
        "title <x>", "label & more", [("/secret/dir/0123.png", TRICKY)], banner="**Demo** `x`"
    )
    escaped = "a&lt;b&gt;&amp;&quot;c&#x27;.png"
    assert FIGURE.findall(block) == [("page/pictures/0123.png", escaped, escaped)]
    assert "/secret" not in block and TRICKY not in block
    assert "<h1>title &lt;x&gt;</h1>" in block and "label &amp; more" in block
    assert '<p class="hbird-banner"><b>Demo</b> <code>x</code></p>' in block


@pytest.fixture()
def served(tmp_path):
    """A workspace of four 32 x 48 scenes (one with a name to escape), its page model and
    a test client over the REST app with the first paint on a stand-in page."""
    from fastapi.testclient import TestClient

    app, ws, model = served_app(tmp_path)
    with TestClient(app) as client:
        yield client, ws, model


def served_app(tmp_path, opened=None, warm=False):
    """The REST app of ``served`` (``opened(workspace)`` runs before the page model is
    made: a workspace resumed with prompts and predictions), its workspace and page model."""
    from fastapi import Request
    from fastapi.responses import HTMLResponse

    from hbird.serve.app import create_app

    folder = tmp_path / "photos"
    folder.mkdir()
    names = ["img0.png", "img1.png", TRICKY, "img3.png"]
    for name, s in zip(names, make_scenes(4, seed=3, size=(32, 48))):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / name)
    app = create_app(folder, tmp_path / "state", ["background", "a", "b"], SETTINGS)
    ws = app.state.workspace("default")
    if opened is not None:
        opened(ws)
    model = PageModel(ws)
    serve_first_paint(app, model.files, model.first_paint, warm=warm)

    @app.get("/")
    def page(request: Request) -> HTMLResponse:  # says which encoding it was offered
        return HTMLResponse(STAND_IN.format(request.headers.get("accept-encoding")))

    return app, ws, model


def gallery(client) -> list[tuple[str, str, np.ndarray]]:
    """The first paint's ``(image name, caption, picture)`` per figure, in order, from
    ``GET /`` (each picture's ``alt`` is its caption, as in Gradio's gallery)."""
    response = client.get("/", headers={"Accept-Encoding": "gzip, br"})
    body = response.text
    assert response.status_code == 200 and int(response.headers["content-length"]) == len(
        response.content
    )
    assert "<!--None-->" in body  # the page was asked for uncompressed HTML, to edit it
    assert body.index(f'<div id="{BLOCK_ID}">') < body.index("<gradio-app")
    figures = []
    for src, alt, caption in FIGURE.findall(body):
        picture = client.get("/" + src)
        assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"
        rgb = np.asarray(Image.open(io.BytesIO(picture.content)).convert("RGB"))
        assert alt == caption
        caption = html.unescape(caption)
        figures.append((caption.split(" · ")[0], caption, rgb.astype(np.float64)))
    return figures


def pixels(ws, name: str) -> np.ndarray:
    return np.asarray(Image.open(ws.image_path(name)).convert("RGB")).astype(np.float64)


def test_the_html_of_the_page_holds_the_workspace_gallery_as_it_is_now(served):
    client, ws, model = served
    # an empty prompt: every image plain, by name, names escaped in the HTML
    shown = gallery(client)
    assert [n for n, _, _ in shown] == sorted(ws.image_names) == [c for _, c, _ in shown]
    for name, _, rgb in shown:
        assert np.array_equal(rgb, pixels(ws, name))
    body = client.get("/").text
    assert TRICKY not in body and html.escape(TRICKY) in body

    # a prompt and two predictions: those first, least confident first, as overlays
    mask = np.full((32, 48), 255, dtype=np.uint8)
    mask[:16], mask[24:] = 1, 0
    ws.add_prompt("img0.png", png(mask))
    for name in (TRICKY, "img3.png"):
        ws.predict(name)
    means = {n: float(ws.predict(n).confidence.mean()) for n in (TRICKY, "img3.png")}
    predicted = sorted(means, key=lambda n: (means[n], n))
    expected = [f"{n} · {means[n]:.2f}" for n in predicted] + ["img0.png · prompt", "img1.png"]
    shown = gallery(client)
    assert [caption for _, caption, _ in shown] == expected
    for name, _, rgb in shown[:2]:
        overlay = (pixels(ws, name) + VOC[ws.predict(name).labels.numpy()]) / 2
        assert np.abs(rgb - overlay).max() <= 0.5
    assert np.array_equal(shown[3][2], pixels(ws, "img1.png"))

    # a new revision: its predictions are not made yet, so the pictures are plain again;
    # one prediction at the new revision shows with its own confidence
    ws.add_prompt("img1.png", png(mask))
    assert [c for _, c, _ in gallery(client)] == [
        TRICKY,  # "a" sorts before "i"
        "img0.png · prompt",
        "img1.png · prompt",
        "img3.png",
    ]
    mean = float(ws.predict("img3.png").confidence.mean())
    first = gallery(client)[0]
    assert first[1] == f"img3.png · {mean:.2f}" and mean != means["img3.png"]


def test_the_picture_route_serves_only_the_pages_own_files_by_name(served):
    client, ws, model = served
    src = FIGURE.findall(client.get("/").text)[0][0]
    assert client.get("/" + src).headers["cache-control"].endswith("immutable")
    stray = model.files.folder / ("0" * 64 + ".png")  # in the folder, never handed out
    stray.write_bytes(png(np.zeros((2, 2), dtype=np.uint8)))
    for name in (stray.name, "..%2F..%2Fetc%2Fpasswd", "x.png", src.split("/")[-1] + "x"):
        response = client.get(f"/page/pictures/{name}")
        assert response.status_code == 404, name
    assert "reload the page" in client.get(f"/page/pictures/{stray.name}").json()["detail"]
    described = client.get("/api/workspaces/default")  # the REST app passes untouched
    assert described.status_code == 200 and described.json()["images"] == ws.image_names


def test_warm_draws_the_opening_gallery_before_the_first_request(tmp_path, monkeypatch):
    """``hbird serve`` warms the first paint: a resumed workspace's overlays are drawn in
    the background at start, so the first page request draws nothing and shows them."""
    from fastapi.testclient import TestClient

    mask = np.zeros((32, 48), dtype=np.uint8)
    mask[:16] = 1

    def resumed(ws):
        ws.add_prompt("img0.png", png(mask))
        ws.predict("img1.png"), ws.predict("img3.png")

    drawn = []
    original_view = PageModel.view
    monkeypatch.setattr(PageModel, "view", lambda self, name, *a: drawn.append(name) or original_view(self, name, *a))  # fmt: skip
    app, ws, model = served_app(tmp_path, resumed, warm=True)
    app.state.first_paint_warmup.join(timeout=60)
    assert sorted(drawn) == ["img1.png", "img3.png"]  # the two overlays, before any request
    with TestClient(app) as client:
        shown = gallery(client)
    assert sorted(drawn) == ["img1.png", "img3.png"]  # the request drew nothing again
    for name, _, rgb in shown[:2]:
        overlay = (pixels(ws, name) + VOC[ws.predict(name).labels.numpy()]) / 2
        assert np.abs(rgb - overlay).max() <= 0.5


@pytest.mark.slow
@pytest.mark.skipif(not is_available("gradio"), reason='needs gradio (pip install "hbird[serve]")')
def test_gradios_page_carries_the_first_paint(tmp_path, monkeypatch):
    """The real page: Gradio's HTML of ``/`` with the block before its ``<gradio-app>`` and
    its client config intact; ``first_paint=False`` serves Gradio's HTML alone."""
    from fastapi.testclient import TestClient

    from hbird.serve.app import create_app
    from hbird.serve.page import mount_page

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    scenes = make_scenes(3, seed=0, size=(32, 48))
    folder = write_scene_folder(tmp_path / "data", scenes, with_depth=False) / "images"
    for first_paint in (True, False):
        app = create_app(folder, tmp_path / f"state{first_paint}", ["background", "a"], SETTINGS)
        app = mount_page(app, app.state.workspace("default"), first_paint=first_paint)
        with TestClient(app) as client:
            body = client.get("/").text
            figures = FIGURE.findall(body)
            assert "window.gradio_config" in body and "<gradio-app" in body
            if first_paint:
                assert [c for _, _, c in figures] == [f"scene_000{i}.png" for i in range(3)]
                assert body.index(BLOCK_ID) < body.index("<gradio-app")
                assert client.get("/" + figures[0][0]).status_code == 200
            else:
                assert figures == [] and BLOCK_ID not in body
