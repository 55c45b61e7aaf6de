"""``hbird serve``'s interactive loop: re-predicting a folder after one prompt change.

Issue 16's target: with a ViT-S-sized random encoder at 224 px on this 2-core CPU,
after adding one prompt image, re-predicting 100 cached images takes under 2 s. The
script builds a workspace on seeded synthetic scenes, predicts every image once (this
fills the feature cache: the encoder runs), then repeats: add one prompt image,
re-predict all (cached: search and decode only), remove it again. It reports each
phase's min and median over the repeats, and the same re-prediction without the cache
as the baseline on equal work.

    python benchmarks/serve.py --images 100 --repeats 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import environment, peak_rss_bytes, set_threads, settings, write_report
from PIL import Image

from hbird.data.synthetic import make_scenes
from hbird.serve.workspace import Workspace

DEFAULT_OUT = Path(__file__).parent / "results" / "serve.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
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
    return {"min_s": min(seconds), "median_s": statistics.median(seconds), "runs": seconds}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    scenes = make_scenes(args.images, seed=0, size=(args.image_size, args.image_size))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for i, s in enumerate(scenes):
            rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / f"img{i:03d}.png")
        options = dict(
            encoder=args.encoder, pretrained=False, image_size=args.image_size, memory_size=None
        )
        classes = ["background", *[f"class{c}" for c in range(1, 4)]]
        ws = Workspace(folder, Path(tmp) / "ws", classes, options)
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
        baseline = Workspace(folder, Path(tmp) / "plain", classes, uncached_options)
        for i in range(args.prompt + 1):
            baseline.add_prompt(f"img{i:03d}.png", png(scenes[i].mask))
        plain = [timed(baseline.predict_all) for _ in range(1)]
    report = {
        "benchmark": "serve",
        "settings": settings(args),
        "environment": environment(),
        "first_predict_all_encoding": first,
        "add_one_prompt": summary(add),
        "repredict_all_cached": summary(cached),
        "remove_prompt": summary(remove),
        "repredict_all_uncached_baseline": summary(plain),
        "speedup_cached_vs_uncached_median": statistics.median(plain) / statistics.median(cached),
        "target_s": 2.0,
        "peak_rss_bytes": peak_rss_bytes(),
    }
    write_report(report, args.out)
    print(
        f"re-predict {args.images} cached images after one prompt change: "
        f"min {min(cached):.2f} s, median {statistics.median(cached):.2f} s "
        f"(uncached {statistics.median(plain):.2f} s; target 2 s)"
    )


if __name__ == "__main__":
    main()
