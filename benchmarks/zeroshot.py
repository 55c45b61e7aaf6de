"""Benchmark ReCo's three stages: the collection index (per 1k images), building the
references (per class) and predicting (per image), at 224 pixels.

Models have random weights and ViT-S-sized towers (nothing is downloaded):

- retrieval CLIP: open_clip ``ViT-S-16`` (``--clip``; ``test_clip`` if open_clip is missing);
- DenseCLIP: open_clip ``RN50`` (``--dense-clip``; ``none`` disables it);
- image encoder: timm ``vit_small_patch16_224`` (``--encoder``), as DeiT-S/16 in the paper.

The collection is ``--images`` synthetic scenes (``hbird.data.synthetic``) written as PNGs
of ``--image-side`` pixels. Every stage runs ``--repeats`` times; the JSON holds each
time, the min and the median, and the peak resident memory above the stage's start
(sampled every 5 ms):

- ``index``: ``ImageCollection.build`` into a fresh folder (reading, CLIP preprocessing,
  embedding, shards), reported per 1k images;
- ``build``: ``ReCo.build`` of ``--classes`` class names (retrieval of k = 50, archive
  features, DenseCLIP weights, co-segmentation; the 5 context classes are built too),
  reported per class built (contexts included);
- ``predict``: ``ReCo.predict`` on one 224×224 image (encoder, S_c, dense inference).

    python benchmarks/zeroshot.py --threads 1                      # a few minutes
    python benchmarks/zeroshot.py --images 100 --repeats 2 --queries 3 --threads 1   # short

Writes JSON to ``benchmarks/results/zeroshot.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import environment, rss_bytes, set_threads, settings, write_report

from hbird import _optional
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.encoders import create_encoder
from hbird.zeroshot.clip import create_clip
from hbird.zeroshot.collection import ImageCollection
from hbird.zeroshot.reco import ReCo

DEFAULT_OUT = Path(__file__).parent / "results" / "zeroshot.json"
CLASS_NAMES = ("car", "bicycle", "traffic sign", "bus", "rider", "wall", "fence", "terrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_clip = "ViT-S-16" if _optional.is_available("open_clip") else "test_clip"
    parser.add_argument("--clip", default=default_clip, help="retrieval CLIP (random weights)")
    parser.add_argument("--dense-clip", default="RN50", help="DenseCLIP ResNet, or none")
    parser.add_argument("--encoder", default="vit_small_patch16_224", help="random weights")
    parser.add_argument("--images", type=int, default=300, help="collection size")
    parser.add_argument("--image-side", type=int, default=256, help="collection image side")
    parser.add_argument("--classes", type=int, default=3, help="classes built (plus 5 contexts)")
    parser.add_argument("--k", type=int, default=50, help="archive size")
    parser.add_argument("--queries", type=int, default=5, help="images predicted per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


class PeakMemory:
    """Peak RSS above the value at entry, sampled every ``interval`` seconds in a thread."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() - self.start)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() - self.start)


def timed(stage: str, run: Callable[[int], Any], repeats: int, per: float) -> dict[str, Any]:
    """``run(r)`` for ``r`` in ``range(repeats)``: seconds / ``per`` each, min, median, peak
    MB (printed as soon as the stage is done)."""
    seconds, peaks = [], []
    for r in range(repeats):
        with PeakMemory() as memory:
            start = time.perf_counter()
            run(r)
            seconds.append((time.perf_counter() - start) / per)
        peaks.append(memory.peak / 2**20)
    row: dict[str, Any] = {
        "seconds": seconds,
        "min": min(seconds),
        "median": statistics.median(seconds),
        "peak_rss_increase_mb": max(peaks),
    }
    print(
        f"{stage}: min {row['min']:.3f} s, median {row['median']:.3f} s, peak +{max(peaks):.0f} MB"
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    torch.manual_seed(0)
    clip = create_clip(args.clip, pretrained=False)
    dense = None if args.dense_clip == "none" else create_clip(args.dense_clip, pretrained=False)
    encoder = create_encoder(args.encoder, pretrained=False)
    classes = list(CLASS_NAMES[: args.classes])
    queries = [s.image for s in make_scenes(args.queries, seed=1, size=(224, 224))]
    report: dict[str, Any] = {"settings": settings(args), "environment": environment()}
    with tempfile.TemporaryDirectory() as tmp:
        side = (args.image_side, args.image_side)
        folder = write_scene_folder(
            Path(tmp) / "images", make_scenes(args.images, seed=0, size=side), with_depth=False
        )
        collections: list[ImageCollection] = []

        def index(r: int) -> None:
            out = Path(tmp) / f"collection_{r}"
            collections.append(
                ImageCollection.build(folder / "images", clip=clip, out=out, progress=False)
            )

        report["index_per_1k_images"] = timed(
            "index per 1k images", index, args.repeats, args.images / 1000
        )
        reco = ReCo(
            collection=collections[0],
            encoder=encoder,
            dense_clip=dense,
            clip=clip,
            k=args.k,
            progress=False,
        )
        built = len(classes) + len([c for c in reco.settings.contexts if c not in classes])
        report["build_per_class"] = timed(
            "build per class", lambda r: reco.build(classes), args.repeats, built
        )
        report["build_per_class"]["classes_built"] = built

        def predict(r: int) -> None:
            for image in queries:
                reco.predict([image])

        report["predict_per_image"] = timed(
            "predict per image", predict, args.repeats, len(queries)
        )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
