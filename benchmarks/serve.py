"""``hbird serve``'s interactive loop: re-predicting after a prompt change; first page load.

Issue 16's targets on this 2-core CPU, with a ViT-S-sized random encoder at 224 px:

- ``repredict``: after adding one prompt image, re-predicting 100 cached images takes
  under 2 s. The case builds a workspace on seeded synthetic scenes, predicts every image
  once (this fills the feature cache: the encoder runs), then repeats: add one prompt
  image, re-predict all (cached: search and decode only), remove it again. It reports
  each phase's min and median over the repeats, and the same re-prediction without the
  cache as the baseline on equal work.
- ``page``: the first page load takes under 1 s. The case serves the page and REST app
  (uvicorn, in a thread) over the same folder, and times, over HTTP on localhost, the
  page's HTML plus every script and stylesheet the HTML names, fetched one after another
  (a browser fetches them in parallel, so this is an upper bound). The very first load
  after start is reported apart from the repeats' min and median.

    python benchmarks/serve.py --images 100 --repeats 3
    python benchmarks/serve.py --case page --repeats 20
"""

from __future__ import annotations

import argparse
import io
import re
import socket
import statistics
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from _common import environment, peak_rss_bytes, set_threads, settings, write_report
from PIL import Image

from hbird.data.synthetic import make_scenes
from hbird.serve.workspace import Workspace

DEFAULT_OUT = Path(__file__).parent / "results" / "serve.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=("repredict", "page", "both"), default="both")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--prompt", type=int, default=3, help="prompt images before the change")
    p.add_argument("--encoder", default="vit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args()


def png(mask) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(seconds: list[float]) -> dict[str, float]:
    measured = [s for s in seconds if s == s] or [float("nan")]  # NaN: not seen that load
    return {"min_s": min(measured), "median_s": statistics.median(measured), "runs": seconds}


def write_folder(folder: Path, scenes) -> None:
    folder.mkdir()
    for i, s in enumerate(scenes):
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"img{i:03d}.png")


def repredict_case(args, scenes, folder: Path, tmp: Path, options, classes) -> dict:
    ws = Workspace(folder, tmp / "ws", classes, options)
    for i in range(args.prompt):
        ws.add_prompt(f"img{i:03d}.png", png(scenes[i].mask))
    first = timed(ws.predict_all)  # encodes every image once, filling the cache
    extra = f"img{args.prompt:03d}.png"
    add, cached, remove = [], [], []
    for _ in range(args.repeats):
        add.append(timed(lambda: ws.add_prompt(extra, png(scenes[args.prompt].mask))))
        cached.append(timed(ws.predict_all))
        remove.append(timed(lambda: ws.remove_prompt(extra)))
    uncached_options = {**options, "feature_cache": None}
    baseline = Workspace(folder, tmp / "plain", classes, uncached_options)
    for i in range(args.prompt + 1):
        baseline.add_prompt(f"img{i:03d}.png", png(scenes[i].mask))
    plain = [timed(baseline.predict_all) for _ in range(1)]
    print(
        f"re-predict {args.images} cached images after one prompt change: "
        f"min {min(cached):.2f} s, median {statistics.median(cached):.2f} s "
        f"(uncached {statistics.median(plain):.2f} s; target 2 s)"
    )
    return {
        "first_predict_all_encoding": first,
        "add_one_prompt": summary(add),
        "repredict_all_cached": summary(cached),
        "remove_prompt": summary(remove),
        "repredict_all_uncached_baseline": summary(plain),
        "speedup_cached_vs_uncached_median": statistics.median(plain) / statistics.median(cached),
        "target_s": 2.0,
    }


ASSET = re.compile(r"""<(?:script|link)\b[^>]*?(?:src|href)=["']([^"']+\.(?:js|css))["']""")


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as response:
        return response.read()


def load_page(url: str) -> tuple[float, int, int]:
    """Seconds to fetch the page's HTML and the scripts and stylesheets it names; the
    number of assets and the bytes fetched."""
    start = time.perf_counter()
    html = fetch(url + "/").decode()
    assets = sorted(set(ASSET.findall(html)))
    size = len(html)
    for asset in assets:
        size += len(fetch(urllib.parse.urljoin(url + "/", asset)))
    return time.perf_counter() - start, len(assets), size


GALLERY_OBSERVER = """
new MutationObserver(() => {
  const img = document.querySelector('#gallery img');
  if (img && window.hbirdGalleryImg === undefined) {
    window.hbirdGalleryImg = performance.now();
    const shown = () => { window.hbirdGalleryShown ??= performance.now(); };
    if (img.complete && img.naturalWidth) shown(); else img.addEventListener('load', shown);
  }
}).observe(document, {childList: true, subtree: true});
"""
"""Installed before each navigation: notes (page clock, ms) when the gallery's first
``<img>`` enters the page and when its picture has loaded."""


SPLIT = """
const t = performance.getEntriesByType('navigation')[0];
const resources = performance.getEntriesByType('resource');
const img = window.hbirdGalleryImg;
const scripts = resources.filter(e => e.initiatorType === 'script' && e.startTime < img);
const first = document.querySelector('#gallery img');
const picture = resources.find(e => first && e.name === first.src);
return [t.responseEnd, t.domContentLoadedEventEnd, t.loadEventEnd,
        Math.max(...scripts.map(e => e.responseEnd)), img,
        picture ? picture.startTime : NaN, window.hbirdGalleryShown];
"""
"""The split of one load (page clock, ms): the HTML received, DOMContentLoaded, the load
event, the last script fetched before the gallery's first ``<img>`` entered the page, that
``<img>``, its picture's request sent, and its picture loaded."""


def browser_loads(url: str, repeats: int) -> dict | None:
    """First loads in headless Chromium with its cache disabled (every load is a first
    load), on the page's own clock from navigation: the HTML received, DOMContentLoaded,
    the load event, the last script the gallery waited for, the gallery's first ``<img>``
    in the page, its picture requested and loaded (:data:`SPLIT`), and
    the page settled (the page's load event handler answered: its ``queue/data`` stream
    ended); also seconds until WebDriver saw the picture (this adds its polling, which
    waits while the page's main thread is busy). ``None`` without Selenium, Chromium or
    chromedriver."""
    import shutil

    from hbird._optional import is_available

    binary, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (is_available("selenium") and binary and driver_path):
        return None
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    keys = (
        "html",
        "dom_content_loaded",
        "load_event",
        "scripts",
        "gallery_img",
        "gallery_requested",
        "gallery_shown",
    )
    phases: dict[str, list[float]] = {key: [] for key in (*keys, "settled", "webdriver_saw")}
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": GALLERY_OBSERVER}
        )
        for _ in range(repeats):
            driver.get("about:blank")
            start = time.perf_counter()
            driver.get(url + "/")
            while not driver.execute_script("return window.hbirdGalleryShown !== undefined"):
                time.sleep(0.01)
            phases["webdriver_saw"].append(time.perf_counter() - start)
            timing = driver.execute_script(SPLIT)
            for key, ms in zip(keys, timing):
                phases[key].append(ms / 1000)
            phases["settled"].append(settled(driver) / 1000)
    finally:
        driver.quit()
    return {key: summary(values) for key, values in phases.items()}


def settled(driver, timeout: float = 60.0) -> float:
    """Page-clock ms when the page's load event handler had answered (the end of its
    ``queue/data`` event stream)."""
    deadline = time.monotonic() + timeout
    ends: list[float] = []
    while time.monotonic() < deadline:
        ends = driver.execute_script(
            "return performance.getEntriesByType('resource')"
            ".filter(e => e.name.includes('/queue/data')).map(e => e.responseEnd);"
        )
        if ends and all(end > 0 for end in ends):
            break
        time.sleep(0.05)
    return max(ends, default=float("nan"))


def page_case(args, folder: Path, tmp: Path, options, classes) -> dict:
    import uvicorn

    from hbird.serve.app import create_app
    from hbird.serve.page import mount_page

    started = time.perf_counter()
    app = create_app(folder, tmp / "state", classes, options)
    app = mount_page(app, app.state.workspace("default"))
    build = time.perf_counter() - started
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    try:
        first, assets, size = load_page(url)
        loads = [load_page(url)[0] for _ in range(args.repeats)]
        in_browser = browser_loads(url, args.repeats)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(
        f"first page load (HTML + {assets} assets, {size / 2**20:.1f} MiB): very first "
        f"{first:.3f} s, then min {min(loads):.3f} s, median {statistics.median(loads):.3f} s "
        "(target 1 s)"
    )
    if in_browser:
        print("in headless Chromium, no cache (min / median s):")
        for key, row in in_browser.items():
            print(f"  {key:20s} {row['min_s']:.3f} / {row['median_s']:.3f}")
    return {
        "browser": in_browser,
        "page_build_s": build,
        "very_first_load_s": first,
        "load": summary(loads),
        "assets": assets,
        "bytes": size,
        "target_s": 1.0,
    }


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    scenes = make_scenes(args.images, seed=0, size=(args.image_size, args.image_size))
    options = dict(
        encoder=args.encoder, pretrained=False, image_size=args.image_size, memory_size=None
    )
    classes = ["background", *[f"class{c}" for c in range(1, 4)]]
    report = {"benchmark": "serve", "settings": settings(args), "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        write_folder(folder, scenes)
        if args.case in ("repredict", "both"):
            report.update(repredict_case(args, scenes, folder, Path(tmp), options, classes))
        if args.case in ("page", "both"):
            report["first_page_load"] = page_case(args, folder, Path(tmp), options, classes)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_report(report, args.out)


if __name__ == "__main__":
    main()
