"""``hbird serve``'s interactive loop: re-predicting after a prompt change; first page load.

Issue 16's targets on this 2-core CPU, with a ViT-S-sized random encoder at 224 px:

- ``repredict``: after adding one prompt image, re-predicting 100 cached images takes
  under 2 s. The case builds a workspace on seeded synthetic scenes, predicts every image
  once (this fills the feature cache: the encoder runs), then repeats: add one prompt
  image, re-predict all (cached: search and decode only), remove it again. It reports
  each phase's min and median over the repeats, and the same re-prediction without the
  cache as the baseline on equal work.
- ``page``: the first page load takes under 1 s. The case serves the page and REST app
  (uvicorn, in a thread) over the same folder, once per ``--variants`` entry (Gradio's
  page alone, and with the first paint: the gallery in the page's HTML), each on its own
  port, and times, over HTTP on localhost, the page's HTML plus every script and
  stylesheet the HTML names, fetched one after another (a browser fetches them in
  parallel, so this is an upper bound; the very first load after start is reported
  apart), then, with Chromium, first loads in headless Chromium, the variants in turn
  (:func:`browser_loads`). ``--predicted`` prompts and predicts the folder first, so the
  gallery shows overlays and confidences.

    python benchmarks/serve.py --images 100 --repeats 3
    python benchmarks/serve.py --case page --repeats 10 --threads 1 --predicted
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
    p.add_argument(
        "--variants",
        default="gradio,first-paint",
        help="pages served side by side and loaded in turn (page case): gradio, first-paint",
    )
    p.add_argument(
        "--predicted",
        action="store_true",
        help="page case: prompt and predict all first, so the gallery shows predictions",
    )
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
const note = (selector, key) => {
  const img = document.querySelector(selector);
  if (img && window[key + 'Img'] === undefined) {
    window[key + 'Img'] = performance.now();
    const shown = () => { window[key + 'Shown'] ??= performance.now(); };
    if (img.complete && img.naturalWidth) shown(); else img.addEventListener('load', shown);
  }
};
new MutationObserver(() => {
  note('#hbird-first-paint img, #gallery img', 'hbirdFirst');
  note('#gallery img', 'hbirdGallery');
}).observe(document, {childList: true, subtree: true});
new PerformanceObserver(list => {
  for (const e of list.getEntries())  // the earliest painted first-paint picture
    if (e.identifier === 'hbird-first-paint')
      window.hbirdFirstPainted =
        Math.min(window.hbirdFirstPainted ?? Infinity, e.renderTime || e.loadTime);
}).observe({type: 'element', buffered: true});
"""
"""Installed before each navigation: notes (page clock, ms) when the first gallery
``<img>`` enters the page and when its picture has loaded, for the first one of either
gallery (the first paint's or Gradio's, ``hbirdFirst``) and for Gradio's
(``hbirdGallery``), and when Chromium painted a first-paint picture (Element Timing)."""


SPLIT = """
const t = performance.getEntriesByType('navigation')[0];
const resources = performance.getEntriesByType('resource');
const img = window.hbirdGalleryImg;
const scripts = resources.filter(e => e.initiatorType === 'script' && e.startTime < img);
const nan = v => v === undefined ? NaN : v;
return [t.responseEnd, t.domContentLoadedEventEnd, t.loadEventEnd,
        window.hbirdFirstImg, window.hbirdFirstShown, nan(window.hbirdFirstPainted),
        Math.max(...scripts.map(e => e.responseEnd)), img, window.hbirdGalleryShown];
"""
"""The split of one load (page clock, ms): the HTML received, DOMContentLoaded, the load
event; the first gallery picture of either gallery in the page, loaded, and painted (a
first-paint picture, by Element Timing; NaN without a first paint); the last script
fetched before Gradio's gallery rendered, its first ``<img>`` and that picture loaded."""

SPLIT_KEYS = (
    "html",
    "dom_content_loaded",
    "load_event",
    "first_img",
    "first_shown",
    "first_painted",
    "scripts",
    "gradio_gallery_img",
    "gradio_gallery_shown",
)


def browser_loads(urls: dict[str, str], repeats: int) -> dict | None:
    """First loads in headless Chromium with its cache disabled (every load is a first
    load), on the page's own clock from navigation (:data:`SPLIT`), the pages of ``urls``
    loaded in turn (one warm-up round, not counted, then ``repeats`` rounds), and the
    page settled (the page's load event handler answered: its ``queue/data`` stream
    ended); also seconds until WebDriver saw Gradio's gallery picture (this adds its
    polling, which waits while the page's main thread is busy). ``None`` without
    Selenium, Chromium or chromedriver."""
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
    keys = (*SPLIT_KEYS, "settled", "webdriver_saw")
    phases = {name: {key: [] for key in keys} for name in urls}
    try:
        driver.execute_cdp_cmd("Network.enable", {})
        driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
        driver.execute_cdp_cmd(
            "Page.addScriptToEvaluateOnNewDocument", {"source": GALLERY_OBSERVER}
        )
        for round_ in range(repeats + 1):
            for name, url in urls.items():
                timing = one_load(driver, url)
                if round_ > 0:  # round 0 warms the servers and the browser up
                    for key, value in zip(keys, timing):
                        phases[name][key].append(value)
    finally:
        driver.quit()
    return {name: {k: summary(v) for k, v in rows.items()} for name, rows in phases.items()}


def one_load(driver, url: str) -> list[float]:
    """One load's :data:`SPLIT` and settled time (s, page clock), and WebDriver's wait."""
    driver.get("about:blank")
    start = time.perf_counter()
    driver.get(url + "/")
    while not driver.execute_script("return window.hbirdGalleryShown !== undefined"):
        time.sleep(0.01)
    saw = time.perf_counter() - start
    split = [float("nan") if ms is None else ms / 1000 for ms in driver.execute_script(SPLIT)]
    return [*split, settled(driver) / 1000, saw]


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


VARIANTS = {"gradio": False, "first-paint": True}
"""The pages the ``page`` case can serve side by side: Gradio's page alone (``gradio``,
as before the first paint) and with the first paint in its HTML."""


def page_case(args, scenes, folder: Path, tmp: Path, options, classes) -> dict:
    import uvicorn

    from hbird.serve.app import create_app
    from hbird.serve.page import mount_page

    variants = args.variants.split(",")
    shared = {**options, "feature_cache": str(tmp / "features")}  # each image encoded once
    servers, urls, builds = [], {}, {}
    for name in variants:
        started = time.perf_counter()
        app = create_app(folder, tmp / f"state-{name}", classes, shared)
        ws = app.state.workspace("default")
        if args.predicted:  # the gallery shows predictions: a prompt, then predict all
            for i in range(args.prompt):
                ws.add_prompt(f"img{i:03d}.png", png(scenes[i].mask))
            ws.predict_all()
        app = mount_page(app, ws, first_paint=VARIANTS[name])
        builds[name] = time.perf_counter() - started
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        servers.append((server, thread))
        urls[name] = f"http://127.0.0.1:{port}"
    results = {}
    try:
        for name, url in urls.items():
            first, assets, size = load_page(url)
            loads = [load_page(url)[0] for _ in range(args.repeats)]
            results[name] = {
                "page_build_s": builds[name],
                "very_first_load_s": first,
                "load": summary(loads),
                "assets": assets,
                "bytes": size,
            }
            print(
                f"{name}: HTML + {assets} assets, {size / 2**20:.1f} MiB, fetched one after "
                f"another: very first {first:.3f} s, then min {min(loads):.3f} s, "
                f"median {statistics.median(loads):.3f} s"
            )
        in_browser = browser_loads(urls, args.repeats)
    finally:
        for server, thread in servers:
            server.should_exit = True
            thread.join(timeout=10)
    if in_browser:
        print(f"in headless Chromium, no cache, {args.repeats} loads each (min / median s):")
        print(f"  {'':20s} " + "  ".join(f"{name:>13s}" for name in in_browser))
        for key in in_browser[variants[0]]:
            cells = [in_browser[n][key] for n in in_browser]
            row = "  ".join(f"{c['min_s']:5.2f} / {c['median_s']:5.2f}" for c in cells)
            print(f"  {key:20s} {row}")
    for name in results:
        results[name]["browser"] = (in_browser or {}).get(name)
    return {"variants": results, "predicted": args.predicted, "target_s": 1.0}


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
            report["first_page_load"] = page_case(args, scenes, folder, Path(tmp), options, classes)
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_report(report, args.out)


if __name__ == "__main__":
    main()
