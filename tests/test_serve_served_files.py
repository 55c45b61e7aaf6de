"""Pictures served while page loads send them again arrive whole (issue 16's h11 error).

``benchmarks/serve.py`` logged h11's "Too little data for declared Content-Length" from
Gradio's file route: Gradio stats a file, sends that size as ``Content-Length``, then
reads the file; the page handed it the editor's picture as an array, which Gradio
re-encodes into the same cache file, in place, on every page load. A browser fetching the
picture during another load got a short (or long) body.

The oracle is HTTP itself: every body a client reads must be exactly ``Content-Length``
bytes and decode as the picture first served at that URL (compared as bytes). The test
runs a real server (uvicorn with h11, in a thread) and, for a few seconds, two clients
that trigger the page's load event through Gradio's queue (as a browser does on every
load) while two clients fetch every picture URL of the page. Before the fix it failed in
every run with ``IncompleteRead``.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

from hbird._optional import is_available
from hbird.data.synthetic import make_scenes

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (is_available("gradio") and is_available("uvicorn")),
        reason='needs gradio and uvicorn (pip install "hbird[serve]")',
    ),
]
RUN_S = 12.0
SETTINGS = dict(encoder="test_vit", image_size=64, k=5, index="exact", memory_size=None)


def file_urls(tree, found: set[str]) -> set[str]:
    """Every ``/gradio_api/file=`` URL in a Gradio config or event payload."""
    if isinstance(tree, dict):
        if isinstance(tree.get("url"), str) and "/file=" in tree["url"]:
            found.add(tree["url"])
        for value in tree.values():
            file_urls(value, found)
    elif isinstance(tree, list):
        for value in tree:
            file_urls(value, found)
    return found


def load_event(url: str, fn_index: int, data: list) -> dict:
    """Run the page's load event as a browser does: join the queue, read its event stream
    until the event completed; returns the completed message."""
    session = uuid.uuid4().hex[:10]
    body = {"data": data, "fn_index": fn_index, "session_hash": session, "trigger_id": None}
    request = urllib.request.Request(
        url + "/gradio_api/queue/join",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    urllib.request.urlopen(request, timeout=60).read()
    with urllib.request.urlopen(
        f"{url}/gradio_api/queue/data?session_hash={session}", timeout=60
    ) as r:
        for line in r:
            if line.startswith(b"data:") and b"process_completed" in line:
                return json.loads(line[5:])
    raise AssertionError("the load event's stream ended without completing")


@pytest.fixture()
def page_server(tmp_path, monkeypatch):
    """The page and REST app over six 224 px scenes, served by uvicorn (h11) in a thread;
    Gradio's cache in the test's folder (not shared with other processes)."""
    import uvicorn

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    from hbird.serve.app import create_app
    from hbird.serve.page import mount_page

    folder = tmp_path / "photos"
    folder.mkdir()
    for i, s in enumerate(make_scenes(6, seed=0, size=(224, 224))):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i}.png")
    app = create_app(folder, tmp_path / "state", ["background", "a"], SETTINGS)
    app = mount_page(app, app.state.workspace("default"))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, http="h11", log_level="critical")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the test server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def test_pictures_arrive_whole_while_page_loads_resend_them(page_server):
    url = page_server
    config = json.loads(urllib.request.urlopen(url + "/config", timeout=60).read())
    urls = file_urls(config["components"], set())
    assert urls, "the page's config names no picture files"
    load = next(
        i
        for i, dep in enumerate(config["dependencies"])
        if ["load"] == [t[1] for t in dep["targets"]]
    )
    values = {c["id"]: c["props"].get("value") for c in config["components"]}
    data = [values[i] for i in config["dependencies"][load]["inputs"]]
    first = {u: urllib.request.urlopen(u, timeout=60).read() for u in sorted(urls)}
    file_urls(load_event(url, load, data), urls)  # the load event's pictures too

    stop = time.monotonic() + RUN_S
    bad: list[str] = []
    counts = {"loads": 0, "reads": 0}

    def loads() -> None:
        while time.monotonic() < stop and not bad:
            load_event(url, load, data)
            counts["loads"] += 1

    def reads() -> None:
        while time.monotonic() < stop and not bad:
            for u in sorted(urls):
                try:
                    with urllib.request.urlopen(u, timeout=60) as response:
                        body = response.read()
                        declared = int(response.headers["Content-Length"])
                except Exception as err:  # IncompleteRead: fewer bytes than declared
                    bad.append(f"{u}: {err!r}")
                    continue
                counts["reads"] += 1
                if len(body) != declared or (u in first and body != first[u]):
                    bad.append(f"{u}: {len(body)} bytes read, {declared} declared")

    workers = [threading.Thread(target=fn) for fn in (loads, loads, reads, reads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not bad, f"{len(bad)} bad responses ({counts}), e.g. {bad[:2]}"
    assert counts["loads"] >= 4 and counts["reads"] >= 4 * len(urls), counts
