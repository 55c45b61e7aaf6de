"""The workspace and REST API of ``hbird serve`` (FastAPI's test client, no browser)."""

import io
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from hbird import InContextPredictor
from hbird.data.synthetic import make_scenes
from hbird.serve.workspace import Workspace

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from hbird.serve.app import create_app  # noqa: E402

SETTINGS = dict(encoder="test_vit", image_size=64, k=5, index="exact", memory_size=None)
CLASSES = ["background", "a", "b", "c"]


@pytest.fixture(scope="module")
def scenes():
    return make_scenes(6, seed=3)


@pytest.fixture()
def photos(scenes, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, s in enumerate(scenes):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
    return folder


def png(mask) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def read_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def fresh_prediction(photos, scenes, prompt):
    """Oracle: a predictor built from scratch on the given prompt indices."""
    p = InContextPredictor(**SETTINGS, progress=False)
    p.fit([photos / f"img{i}.png" for i in prompt], [scenes[i].mask for i in prompt], num_classes=4)
    return p.predict([photos / f"img{i}.png" for i in range(len(scenes))])


def test_workspace_add_remove_and_resume_match_fresh_builds(photos, scenes, tmp_path):
    """After adding prompts 0 and 1 then removing 0, predictions equal a bank built on
    prompt 1 alone; a workspace reopened from its folder resumes with the same prompt."""
    ws = Workspace(photos, tmp_path / "ws", CLASSES, SETTINGS)
    ws.add_prompt("img0.png", png(scenes[0].mask))
    ws.add_prompt("img1.png", png(scenes[1].mask))
    both = fresh_prediction(photos, scenes, [0, 1])
    got = [ws.predict(f"img{i}.png").labels for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, both))
    live = ws.predictor()
    ws.remove_prompt("img0.png")
    assert ws.predictor() is live and live.image_ids_ == [1]  # entries removed, no rebuild
    alone = fresh_prediction(photos, scenes, [1])
    got = [ws.predict(f"img{i}.png").labels for i in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(got, alone))
    assert not all(torch.equal(a, b) for a, b in zip(alone, both))  # the removal mattered

    again = Workspace(photos, tmp_path / "ws")
    assert again.prompt == ["img1.png"] and again.classes == CLASSES
    assert torch.equal(again.predict("img3.png").labels, alone[3])
    order = again.predict_all()
    assert list(order) == sorted(order, key=order.get) and len(order) == 6


@pytest.fixture()
def client(photos, tmp_path):
    return TestClient(create_app(photos, tmp_path / "state", CLASSES, SETTINGS))


def test_api_routes_round_trip(client, scenes, photos):
    assert client.get("/api/workspaces").json() == []
    info = client.get("/api/workspaces/w1").json()
    assert info["classes"] == CLASSES and info["prompt"] == [] and len(info["images"]) == 6
    r = client.post("/api/workspaces/w1/prompt/img0.png", files={"mask": png(scenes[0].mask)})
    assert r.status_code == 200 and r.json() == ["img0.png"]
    pred = client.get("/api/workspaces/w1/prediction/img2.png.png")
    assert pred.status_code == 200 and pred.headers["content-type"] == "image/png"
    expected = fresh_prediction(photos, scenes, [0])[2].numpy()
    assert np.array_equal(read_png(pred.content), expected)
    overlay = read_png(client.get("/api/workspaces/w1/overlay/img2.png.png").content)
    assert overlay.shape == (*expected.shape, 3)
    conf = read_png(client.get("/api/workspaces/w1/confidence/img2.png.png").content)
    assert conf.shape == expected.shape and conf.dtype == np.uint8
    scores = client.post("/api/workspaces/w1/predict-all").json()
    assert len(scores) == 6 and list(scores.values()) == sorted(scores.values())
    assert client.delete("/api/workspaces/w1/prompt/img0.png").json() == []
    assert client.get("/api/workspaces").json() == ["w1"]
    assert client.put("/api/workspaces/w1/classes", json=[*CLASSES, "d"]).json()[-1] == "d"
    assert "/api/workspaces/{ws}/prompt/{image}" in client.get("/openapi.json").json()["paths"]


def noise_png(shape, seed=0) -> bytes:
    """An RGB PNG that does not compress (random pixels)."""
    rgb = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "case, status, message",
    [
        ("not an image", 400, "(the upload for img0.png) could not be read as an image"),
        ("wrong size", 400, "paint it on the image itself"),
        ("label out of range", 400, "holds ids [7]"),
        ("colour mask", 400, "(the upload for img0.png) is a colour (RGB) image"),
        ("too many pixels", 400, "a guard against decompression bombs"),
        ("too large", 413, "the upload is larger than the limit of 8,192 bytes (0.00781 MiB)"),
        ("too large, streamed", 413, "larger than the limit of 8,192 bytes"),
    ],
)
def test_bad_uploads_get_a_4xx_with_the_cli_message_and_change_nothing(
    photos, tmp_path, scenes, case, status, message
):
    """Each bad mask upload is refused with the message the CLI's reader gives for the same
    file (naming the upload, not a temporary path) and leaves the workspace as it was:
    the prompt, workspace.json and the masks folder. Pixel rule: hbird.io.images."""
    from hbird.io.images import pixel_limit

    app = create_app(photos, tmp_path / "state", CLASSES, SETTINGS, max_upload_bytes=8192)
    client = TestClient(app)
    url = "/api/workspaces/w1/prompt/img0.png"
    assert client.post(url.replace("img0", "img1"), files={"mask": png(scenes[1].mask)}).is_success
    record = (tmp_path / "state" / "w1" / "workspace.json").read_bytes()
    mask = scenes[0].mask.numpy()
    pixels = mask.size
    with pixel_limit(pixels):  # the image is within the limit, a 4x larger mask is not
        if case == "too large, streamed":  # no Content-Length: counted as it arrives
            body = b"--b\r\nContent-Disposition: form-data; name=mask; filename=m.png\r\n\r\n"
            chunks = iter([body, noise_png(mask.shape), b"\r\n--b--\r\n"])
            headers = {"content-type": "multipart/form-data; boundary=b"}
            r = client.post(url, content=chunks, headers=headers)
        else:
            upload = {
                "not an image": b"hello",
                "wrong size": png(mask[:10, :10]),
                "label out of range": png(
                    np.where(np.arange(mask.size).reshape(mask.shape) == 0, 7, mask)
                ),
                "colour mask": noise_png((mask.shape[0] // 4, mask.shape[1] // 4)),
                "too many pixels": png(np.zeros((2 * mask.shape[0], 2 * mask.shape[1]))),
                "too large": noise_png(mask.shape),
            }[case]
            r = client.post(url, files={"mask": upload})
    assert r.status_code == status and message in r.json()["detail"], (case, r.json())
    assert client.get("/api/workspaces/w1").json()["prompt"] == ["img1.png"]
    assert (tmp_path / "state" / "w1" / "workspace.json").read_bytes() == record
    assert [p.name for p in (tmp_path / "state" / "w1" / "masks").iterdir()] == ["img1.png"]


def test_requests_that_name_no_folder_image_are_refused(client, scenes):
    r = client.post(
        "/api/workspaces/w1/prompt/..%2Fsecret.png", files={"mask": png(scenes[0].mask)}
    )
    assert r.status_code in (400, 404)
    r = client.post("/api/workspaces/w1/prompt/nope.png", files={"mask": png(scenes[0].mask)})
    assert r.status_code == 400 and "no image 'nope.png'" in r.json()["detail"]
    r = client.get("/api/workspaces/w1/prediction/img1.png.png")
    assert r.status_code == 400 and "the prompt is empty" in r.json()["detail"]
    assert client.get("/api/workspaces/bad name!").status_code == 400
    r = client.delete("/api/workspaces/w1/prompt/img1.png")
    assert r.status_code == 400 and "not in the prompt" in r.json()["detail"]


def test_cli_serve_binds_localhost_warns_otherwise_and_runs_a_demo(tmp_path, monkeypatch, capsys):
    """``hbird serve`` through main(argv), with uvicorn.run replaced by a recorder."""
    import uvicorn

    from hbird.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    assert main(["serve", "--state", str(tmp_path / "s")]) == 2
    assert "give --images DIR" in capsys.readouterr().err and not started
    # --api-only: the web page (Gradio, ~20 s to build under load) has its own tests
    serve = ["serve", "--demo", "--api-only", "--state", str(tmp_path / "s")]
    assert main([*serve, "--port", "8123"]) == 0
    out = capsys.readouterr()
    assert "a tiny UNTRAINED encoder" in out.out and "warning" not in out.err
    app, options = started[-1]
    assert options["host"] == "127.0.0.1" and options["port"] == 8123
    demo = TestClient(app).get("/api/workspaces/demo").json()
    assert len(demo["images"]) == 12 and demo["classes"][0] == "background"
    assert main([*serve, "--host", "0.0.0.0"]) == 0
    assert "serves your images to other machines" in capsys.readouterr().err


def test_export_reproduces_the_workspace_from_the_cli(
    client, scenes, photos, tmp_path, monkeypatch
):
    """The exported prompt folder and settings rebuild, with ``hbird predict``, the masks
    the app exported; the exported bank loads and predicts the same."""
    import shlex
    import zipfile

    from hbird.cli import main
    from hbird.io.images import load_mask

    for i in (0, 1):
        client.post(f"/api/workspaces/w1/prompt/img{i}.png", files={"mask": png(scenes[i].mask)})
    r = client.get("/api/workspaces/w1/export.zip")
    assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
    out = tmp_path / "export"
    zipfile.ZipFile(io.BytesIO(r.content)).extractall(out)
    import json

    record = json.loads((out / "settings.json").read_text())
    command = record["commands"]["masks"].replace("MASKS", str(tmp_path / "cli"))
    monkeypatch.chdir(out)  # the commands run from inside the export
    argv = shlex.split(command)[1:] + ["--quiet"]
    assert main(argv) == 0, argv
    for i in range(6):
        exported = load_mask(out / "masks" / f"img{i}.png")
        assert torch.equal(exported, load_mask(tmp_path / "cli" / f"img{i}.png"))
    bank = InContextPredictor.load(out / "bank", progress=False)
    assert torch.equal(
        bank.predict([photos / "img4.png"])[0], load_mask(out / "masks" / "img4.png")
    )


def test_concurrent_requests_on_one_workspace_are_serialised_and_another_is_isolated(
    photos, scenes, tmp_path
):
    """Five threads add five prompt images to a new workspace at once while a sixth works
    on a second workspace: every add is confirmed and on disk (a workspace reopened from
    its folder holds all five), and the second workspace predicts as a fresh build on its
    own prompt alone."""
    from concurrent.futures import ThreadPoolExecutor

    client = TestClient(create_app(photos, tmp_path / "state", CLASSES, SETTINGS))
    start = threading.Barrier(6)

    def add(ws, i):
        start.wait()
        r = client.post(
            f"/api/workspaces/{ws}/prompt/img{i}.png", files={"mask": png(scenes[i].mask)}
        )
        return r.status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(add, ["w1"] * 5 + ["w2"], [0, 1, 2, 3, 4, 5]))
    assert codes == [200] * 6
    assert sorted(client.get("/api/workspaces/w1").json()["prompt"]) == [
        f"img{i}.png" for i in range(5)
    ]
    assert sorted(Workspace(photos, tmp_path / "state" / "w1").prompt) == [
        f"img{i}.png" for i in range(5)
    ]
    assert client.get("/api/workspaces/w2").json()["prompt"] == ["img5.png"]
    got = read_png(client.get("/api/workspaces/w2/prediction/img0.png.png").content)
    assert np.array_equal(got, fresh_prediction(photos, scenes, [5])[0].numpy())


def depth_png(depth_m) -> bytes:
    """A 16-bit PNG in millimetres, written independently of hbird's writer."""
    buffer = io.BytesIO()
    Image.fromarray(np.round(np.asarray(depth_m) * 1000).astype(np.uint16)).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def npy(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array))
    return buffer.getvalue()


def fresh_depth(photos, scenes, prompt, queries):
    """Oracle: a depth predictor fitted from scratch (the folder format's valid range)."""
    from hbird import LabelSpec

    p = InContextPredictor(**SETTINGS, progress=False)
    spec = LabelSpec(task="depth", min_value=1e-3)
    p.fit(
        [photos / f"img{i}.png" for i in prompt], [scenes[i].depth for i in prompt], label_spec=spec
    )
    return p.predict([photos / f"img{i}.png" for i in queries])


@pytest.fixture()
def depth_client(photos, tmp_path):
    return TestClient(create_app(photos, tmp_path / "state", None, SETTINGS, task="depth"))


def test_depth_workspace_from_png_and_npy_uploads(depth_client, photos, scenes):
    """Depth maps uploaded as a 16-bit PNG (mm) and a .npy (metres) predict as a depth
    predictor fitted on the same maps; the prediction PNG holds millimetres, the overlay
    is colour-mapped (turbo: the nearest pixel at its blue end, the farthest at its red), and
    removing a prompt image gives the fit on the other."""
    import matplotlib

    client = depth_client
    assert client.get("/api/workspaces/d").json()["task"] == "depth"
    r = client.post("/api/workspaces/d/prompt/img0.png", files={"mask": depth_png(scenes[0].depth)})
    assert r.status_code == 200, r.json()
    r = client.post("/api/workspaces/d/prompt/img1.png", files={"mask": npy(scenes[1].depth)})
    assert r.json() == ["img0.png", "img1.png"]
    expected = fresh_depth(photos, scenes, [0, 1], [3])[0].numpy()
    got = read_png(client.get("/api/workspaces/d/prediction/img3.png.png").content)
    assert got.dtype == np.uint16 and np.array_equal(got, np.round(expected.astype(float) * 1000))
    overlay = read_png(client.get("/api/workspaces/d/overlay/img3.png.png").content).astype(int)
    near, far = (
        np.unravel_index(expected.argmin(), expected.shape),
        np.unravel_index(expected.argmax(), expected.shape),
    )
    colour = 2 * overlay - read_png((photos / "img3.png").read_bytes()).astype(int)  # alpha 1/2
    turbo = matplotlib.colormaps["turbo"]  # the ends of the robust (2-98 %) depth range
    assert np.abs(colour[near] - np.array(turbo(0.0)[:3]) * 255).max() <= 3
    assert np.abs(colour[far] - np.array(turbo(1.0)[:3]) * 255).max() <= 3
    assert client.delete("/api/workspaces/d/prompt/img0.png").json() == ["img1.png"]
    alone = fresh_depth(photos, scenes, [1], [3])[0].numpy()
    got = read_png(client.get("/api/workspaces/d/prediction/img3.png.png").content)
    assert np.array_equal(got, np.round(alone.astype(float) * 1000))
    assert not np.array_equal(alone, expected)


@pytest.mark.parametrize(
    "case, message",
    [
        ("wrong size", "the depth map for img0.png is 10x10 but the image is"),
        ("no valid depth", "holds no valid depth"),
        ("broken npy", "(the upload for img0.png) could not be read"),
        ("3-d npy", "has shape (2, 3, 4); expected (H, W) in metres"),
        ("colour png", "has 3 dimensions; save it as a single-channel 16-bit PNG in mm"),
    ],
)
def test_bad_depth_uploads_get_a_400_and_change_nothing(depth_client, scenes, case, message):
    depth = scenes[0].depth.numpy()
    upload = {
        "wrong size": depth_png(depth[:10, :10]),
        "no valid depth": npy(np.zeros_like(depth)),
        "broken npy": b"\x93NUMPY garbage",
        "3-d npy": npy(np.ones((2, 3, 4), dtype=np.float32)),
        "colour png": noise_png(depth.shape),
    }[case]
    r = depth_client.post("/api/workspaces/d/prompt/img0.png", files={"mask": upload})
    assert r.status_code == 400 and message in r.json()["detail"], (case, r.json())
    assert depth_client.get("/api/workspaces/d").json()["prompt"] == []
    r = depth_client.put("/api/workspaces/d/classes", json=["a", "b"])
    assert r.status_code == 400 and "a depth workspace has no classes" in r.json()["detail"]


def test_depth_export_reproduces_the_predictions_from_the_cli(
    depth_client, scenes, tmp_path, monkeypatch
):
    """The export of a depth workspace is a depth prompt folder (.npy maps) whose recorded
    ``hbird predict --task depth`` command writes the same depth maps the app exported."""
    import json
    import shlex
    import zipfile

    from hbird.cli import main

    for i in (0, 1):
        depth_client.post(
            f"/api/workspaces/d/prompt/img{i}.png", files={"mask": npy(scenes[i].depth)}
        )
    out = tmp_path / "export"
    zipfile.ZipFile(
        io.BytesIO(depth_client.get("/api/workspaces/d/export.zip").content)
    ).extractall(out)
    assert sorted(p.name for p in (out / "prompt" / "depth").iterdir()) == ["img0.npy", "img1.npy"]
    assert np.array_equal(np.load(out / "prompt" / "depth" / "img1.npy"), scenes[1].depth.numpy())
    record = json.loads((out / "settings.json").read_text())
    monkeypatch.chdir(out)
    argv = shlex.split(record["commands"]["masks"].replace("MASKS", str(tmp_path / "cli")))[1:]
    assert "--task depth" in record["commands"]["masks"] and main([*argv, "--quiet"]) == 0
    for i in range(6):
        exported = np.load(out / "depth" / f"img{i}.npy")
        assert np.array_equal(exported, np.load(tmp_path / "cli" / f"img{i}.npy"))


def test_cli_serve_depth_demo_writes_depth_maps_to_upload(tmp_path, monkeypatch, capsys):
    import uvicorn

    from hbird.cli import main

    started = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append(app))
    argv = ["serve", "--demo", "--task", "depth", "--state", str(tmp_path / "s"), "--api-only"]
    assert main(argv) == 0
    assert len(list((tmp_path / "s" / "demo-data" / "depth").glob("*.png"))) == 12
    assert TestClient(started[-1]).get("/api/workspaces/demo").json()["task"] == "depth"


def test_a_restart_resumes_without_encoding_any_image_again(photos, scenes, tmp_path, monkeypatch):
    """The feature cache lives under the workspace's state folder (``features/``), so a
    restart with the same state refits the bank from the prompt and predicts with no
    encoder call: across both runs each of the 6 images reaches the encoder exactly once
    (counted by the bytes of every image the encoder's forward pass sees)."""
    import hashlib

    from hbird.encoders.base import Encoder

    encoded = []
    forward = Encoder.forward_patches

    def counted(self, x, layers=None):
        encoded.extend(hashlib.sha256(image.numpy().tobytes()).hexdigest() for image in x)
        return forward(self, x, layers)

    monkeypatch.setattr(Encoder, "forward_patches", counted)
    ws = Workspace(photos, tmp_path / "ws", CLASSES, SETTINGS)
    ws.add_prompt("img0.png", png(scenes[0].mask))
    ws.add_prompt("img1.png", png(scenes[1].mask))
    before = {name: ws.predict(name).labels for name in ws.image_names}
    assert len(encoded) == len(set(encoded)) == 6  # the first run encodes each image once
    del ws

    again = Workspace(photos, tmp_path / "ws")  # a restart: nothing kept in memory
    after = {name: again.predict(name).labels for name in again.image_names}
    assert all(torch.equal(before[n], after[n]) for n in before)
    again.add_prompt("img2.png", png(scenes[2].mask))  # a prompt change after the restart
    again.predict_all()
    assert len(encoded) == 6, "an image was encoded again after the restart"
    assert len(list((tmp_path / "ws" / "features").glob("*.safetensors"))) == 6


def test_a_bank_that_cannot_remove_is_rebuilt_and_serve_refuses_shard_bank(
    client, photos, scenes, monkeypatch, tmp_path, capsys
):
    """A workspace's bank is always fitted in its process, so every index kind removes
    (tested above with the exact index); should the live predictor still refuse (here it
    raises what a bank sharded across torchrun processes raises), the confirmed removal
    stands, answered with a 200 rather than a 500, and the predictor is refitted on the
    remaining prompt: its prediction equals a fresh fit on that prompt. ``hbird serve
    --shard-bank`` is refused up front with a message naming the flag."""
    from hbird.cli import main
    from hbird.errors import InputError

    for i in (0, 1):
        client.post(f"/api/workspaces/w/prompt/img{i}.png", files={"mask": png(scenes[i].mask)})
    assert client.get("/api/workspaces/w/prediction/img3.png.png").status_code == 200

    def refuse(self, image_ids):
        raise InputError("a bank sharded across processes (shard_bank) cannot remove images")

    monkeypatch.setattr(InContextPredictor, "remove", refuse)
    r = client.delete("/api/workspaces/w/prompt/img0.png")
    assert r.status_code == 200 and r.json() == ["img1.png"]
    got = read_png(client.get("/api/workspaces/w/prediction/img3.png.png").content)
    assert np.array_equal(got, fresh_prediction(photos, scenes, [1])[3].numpy())

    argv = ["serve", "--demo", "--api-only", "--shard-bank", "--state", str(tmp_path / "s")]
    assert main(argv) == 2
    assert "drop --shard-bank" in capsys.readouterr().err
