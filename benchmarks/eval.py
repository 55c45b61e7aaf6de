"""Benchmark the evaluation harness on a generated synthetic dataset with ``test_vit``.

Reports, for the retrieval protocol (and the linear probe next to it):

- wall time per query image split into loading, encoding, search, decoding and scoring
  (the :class:`~hbird.eval.Report` timings), the memory build time, and the wall time
  of the whole evaluation measured outside it;
- the peak RSS of the process (``getrusage``) after the evaluation;
- metric memory against the number of pixels: a ``ConfusionMatrix`` (150 classes) and a
  ``DepthMetrics`` fed 1 and then 100 large images in this process: their state size
  must not change (ratio 1), the Python allocations during the updates (``tracemalloc``)
  stay a few KB, and the RSS sampled along the 100 updates shows no trend (it moves
  with the allocator's reuse of each update's temporaries), next to the gigabytes that
  storing the pixels would take;
- with ``--bank-images N``: the RSS growth of a streamed bank build
  (``InContextPredictor.build_bank`` of N synthetic scenes into a folder, in a fresh
  process) against the bank's size (its shard files) plus the growth of the same build
  of one batch of scenes (another fresh process): a build that streams stays under their
  sum. ``--bank-rounds R`` repeats both R times (interleaved) and reports min and median;
  ``--bank-only`` skips the other measurements.

    python benchmarks/eval.py                      # ~1 min on 2 cores
    python benchmarks/eval.py --prompt 100 --queries 50 --scene-size 480 640
    python benchmarks/eval.py --bank-images 400 --bank-encoder vit_small_patch16_224
    python benchmarks/eval.py --bank-only --bank-images 300 --bank-rounds 3 --classes 150

Writes JSON to ``benchmarks/results/eval.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import environment, peak_rss_bytes, rss_bytes, set_threads, settings, write_report

from hbird import InContextPredictor
from hbird.data.pairs import PromptPairs
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.encoders import create_encoder
from hbird.encoders.inference import encode_batches
from hbird.eval import evaluate, linear_probe
from hbird.labelspec import LabelSpec
from hbird.memory.bank import MemoryBank
from hbird.metrics import ConfusionMatrix, DepthMetrics

DEFAULT_OUT = Path(__file__).parent / "results" / "eval.json"
STAGES = ("loading", "encode", "search", "decode", "scoring")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", type=int, default=40, help="prompt (train) images")
    parser.add_argument("--queries", type=int, default=24, help="query (val) images")
    parser.add_argument("--scene-size", type=int, nargs=2, default=[240, 320], metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224, help="short side the encoder sees")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--aug-epochs", type=int, default=2)
    parser.add_argument("--memory-size", type=int, default=None)
    parser.add_argument("--index", default="auto")
    parser.add_argument("--metric-size", type=int, nargs=2, default=[1024, 2048], metavar=("H", "W"),
                        help="image size for the metric-memory check")  # fmt: skip
    parser.add_argument("--metric-images", type=int, default=100)
    parser.add_argument("--bank-images", type=int, default=0,
                        help="also measure a streamed bank build of this many scenes")  # fmt: skip
    parser.add_argument("--bank-encoder", default="test_vit")
    parser.add_argument("--bank-image-size", type=int, default=224)
    parser.add_argument("--bank-rounds", type=int, default=1)
    parser.add_argument("--bank-values", default="dense", choices=("dense", "sparse"),
                        help="value storage of the measured bank")  # fmt: skip
    parser.add_argument("--bank-only", action="store_true",
                        help="measure only the bank build (needs --bank-images)")  # fmt: skip
    parser.add_argument("--bank-child", nargs=2, metavar=("MODE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def make_fixture(root: Path, args: argparse.Namespace) -> str:
    scenes = make_scenes(args.prompt + args.queries, seed=0, num_classes=args.classes,
                         size=tuple(args.scene_size))  # fmt: skip
    write_scene_folder(root / "train", scenes[: args.prompt])
    write_scene_folder(root / "val", scenes[args.prompt :], prefix="val")
    return f"folder:root={root}:task=segmentation"


def per_query_split(timings: dict[str, float]) -> dict[str, float]:
    split = {s: timings.get(f"per_query_{s}", 0.0) for s in STAGES}
    split["total"] = sum(split.values())
    return split


def bench_protocols(spec: str, args: argparse.Namespace) -> dict[str, Any]:
    settings = dict(layers=None, image_size=args.image_size, batch_size=8, overlays=0)
    results: dict[str, Any] = {}
    evaluate(
        "test_vit", spec, progress=False, max_queries=1, memory_size=1000, aug_epochs=1, **settings
    )  # fmt: skip  (warm-up: imports, first forward passes)
    start = time.perf_counter()
    report = evaluate("test_vit", spec, progress=False, k=args.k, temperature=args.temperature,
                      aug_epochs=args.aug_epochs, memory_size=args.memory_size, index=args.index,
                      **settings)  # fmt: skip
    wall = time.perf_counter() - start
    queries = report.counts["queries"]
    results["retrieval"] = {
        "miou": report.metrics["miou"],
        "memory_entries": report.counts["memory_entries"],
        "queries": queries,
        "build_memory_seconds": report.timings["build_memory"],
        "per_query_seconds": per_query_split(report.timings),
        "wall_seconds": wall,
        "wall_per_query_excluding_build": (wall - report.timings["build_memory"]) / queries,
        "peak_rss_bytes_after": peak_rss_bytes(),
    }
    start = time.perf_counter()
    probe = linear_probe("test_vit", spec, progress=False, epochs=10, lr=0.1, **settings)
    results["linear_probe"] = {
        "miou": probe.metrics["miou"],
        "train_patches": probe.counts["train_patches"],
        "feature_cache_bytes": probe.counts["cache_bytes"],
        "extract_seconds": probe.timings["extract_features"],
        "train_seconds": probe.timings["train"],
        "per_query_seconds": per_query_split(probe.timings),
        "wall_seconds": time.perf_counter() - start,
        "peak_rss_bytes_after": peak_rss_bytes(),
    }
    return results


def state_bytes(state: dict[str, Any]) -> int:
    """Bytes held by a metric's state: tensors by size, numbers as 8 bytes each."""
    return sum(
        v.element_size() * v.numel() if isinstance(v, torch.Tensor) else 8 for v in state.values()
    )


def metric_memory(
    make: Callable[[], Any], pred: torch.Tensor, target: torch.Tensor, counts: tuple[int, ...]
) -> dict[str, Any]:
    """Feed ``n`` copies of one large image pair to a fresh metric, for every ``n`` in ``counts``.

    RSS is sampled after chosen images of the longest run: it moves with the allocator's
    reuse of the update's temporaries, but must show no trend with the images fed.
    """
    out: dict[str, Any] = {"pixels_per_image": target.numel()}
    out["input_bytes_per_image"] = (
        pred.element_size() * pred.numel() + target.element_size() * target.numel()
    )
    make().update(pred, target)  # warm-up: the allocator's first large blocks
    for n in counts:
        gc.collect()
        metric = make()
        samples = {i for i in (1, 2, 5, 10, 25, 50, 75, 100, n) if i <= n}
        rss: dict[str, int] = {}
        tracemalloc.start()
        start = time.perf_counter()
        for i in range(1, n + 1):
            metric.update(pred, target)
            if i in samples:
                rss[str(i)] = rss_bytes()
        seconds = time.perf_counter() - start
        _, python_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out[str(n)] = {
            "images": n,
            "pixels": n * target.numel(),
            "state_bytes": state_bytes(metric.state_dict()),
            "python_alloc_peak_bytes": python_peak,
            "rss_bytes_after_image": rss,
            "seconds_per_image": seconds / n,
        }
    few, many = out[str(counts[0])], out[str(counts[-1])]
    out["ratio_many_to_one"] = {
        "pixels": many["pixels"] / few["pixels"],
        "state_bytes": many["state_bytes"] / few["state_bytes"],
    }
    # what keeping the valid pixels' (prediction, target) pairs would cost instead
    out["per_pixel_storage_bytes_for_many"] = many["pixels"] * 2 * pred.element_size()
    return out


def bench_metrics(args: argparse.Namespace) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    h, w = args.metric_size
    counts = (1, args.metric_images)
    labels = torch.randint(0, 150, (h, w), generator=gen)
    predicted = torch.where(
        torch.rand(h, w, generator=gen) < 0.7, labels, torch.randint(0, 150, (h, w), generator=gen)
    )
    depth = 0.5 + 9 * torch.rand(h, w, generator=gen)
    guess = depth * (1 + 0.1 * torch.randn(h, w, generator=gen))
    return {
        "confusion_matrix_150": metric_memory(
            lambda: ConfusionMatrix(150), predicted, labels, counts
        ),
        "depth_metrics": metric_memory(DepthMetrics, guess, depth, counts),
    }


def bank_child(mode: str, out: Path, args: argparse.Namespace) -> None:
    """Fresh process: RSS growth of a bank build of one batch of scenes (``batch``) or of
    all ``--bank-images`` (``build``)."""
    side, classes, batch = args.bank_image_size, args.classes, 16
    count = batch if mode == "batch" else args.bank_images
    scenes = make_scenes(count, seed=0, num_classes=classes, size=(side, side))
    torch.manual_seed(0)
    encoder = create_encoder(args.bank_encoder)
    images = [s.image for s in scenes]
    encode_batches(encoder, images[:1])  # warm-up: libraries, first allocations
    gc.collect()
    before = rss_bytes()
    result: dict[str, Any] = {"rss_bytes_before": before}
    values = {"value_storage": args.bank_values} if args.bank_values != "dense" else {}
    with tempfile.TemporaryDirectory() as tmp:
        predictor = InContextPredictor(encoder=encoder, image_size=side, aug_epochs=1,
                                       memory_size=None, batch_size=batch, progress=False,
                                       **values)  # fmt: skip
        spec = LabelSpec(task="segmentation", num_classes=classes)
        pairs = PromptPairs(images, [s.mask for s in scenes], spec)
        bank = predictor.build_bank(pairs, spec, Path(tmp) / "bank")
        result["peak_growth_bytes"] = peak_rss_bytes() - before
        result["entries"] = MemoryBank.read_manifest(bank)["counts"]["entries"]
        result["bank_bytes"] = sum(f.stat().st_size for f in bank.glob("shard_*"))
    out.write_text(json.dumps(result))


def bench_bank_build(args: argparse.Namespace) -> dict[str, Any]:
    """A streamed bank build's RSS growth against the bank's size plus one batch's growth
    (``--bank-rounds`` interleaved repeats: every run, and min / median of each)."""
    runs: dict[str, list[dict[str, Any]]] = {"batch": [], "build": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.bank_rounds):
            for mode in runs:
                out = Path(tmp) / f"{mode}.json"
                argv = [sys.executable, __file__, "--bank-child", mode, str(out),
                        "--bank-images", str(args.bank_images), "--bank-encoder", args.bank_encoder,
                        "--bank-image-size", str(args.bank_image_size), "--classes", str(args.classes),
                        "--bank-values", args.bank_values]  # fmt: skip
                if args.threads:
                    argv += ["--threads", str(args.threads)]
                subprocess.run(argv, check=True)
                runs[mode].append(json.loads(out.read_text()))

    def spread(mode: str) -> dict[str, float]:
        growth = [r["peak_growth_bytes"] for r in runs[mode]]
        return {"min": min(growth), "median": statistics.median(growth)}

    build, batch = spread("build"), spread("batch")
    bank_bytes = runs["build"][0]["bank_bytes"]
    bound = {s: bank_bytes + batch[s] for s in ("min", "median")}
    return {
        "runs": runs,
        "bank_bytes": bank_bytes,
        "entries": runs["build"][0]["entries"],
        "build_growth_bytes": build,
        "batch_growth_bytes": batch,
        "bound_bytes": bound,
        "growth_over_bound": {s: build[s] / bound[s] for s in ("min", "median")},
    }


def print_bank(bank: dict[str, Any], args: argparse.Namespace) -> None:
    mib = 2**20
    build, batch, ratio = (
        bank["build_growth_bytes"],
        bank["batch_growth_bytes"],
        bank["growth_over_bound"],
    )
    print(f"bank build of {args.bank_images} scenes ({bank['entries']} entries, "
          f"{bank['bank_bytes'] / mib:.1f} MiB bank), min (median) over {args.bank_rounds} "
          f"round(s): RSS +{build['min'] / mib:.1f} ({build['median'] / mib:.1f}) MiB; one batch "
          f"+{batch['min'] / mib:.1f} ({batch['median'] / mib:.1f}) MiB; growth / (bank + batch) "
          f"= {ratio['min']:.2f} ({ratio['median']:.2f})", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.bank_child:
        bank_child(args.bank_child[0], Path(args.bank_child[1]), args)
        return {}
    report: dict[str, Any] = {
        "config": settings(args),
        "environment": {
            **environment(),
            "encoder": "test_vit (patch 8, dim 32, depth 2; random weights)",
        },
    }
    if args.bank_only:
        report["bank_build_memory"] = bank = bench_bank_build(args)
        print_bank(bank, args)
        write_report(report, args.out)
        return report
    with tempfile.TemporaryDirectory() as tmp:
        spec = make_fixture(Path(tmp), args)
        print(
            f"protocols: {args.prompt} prompt / {args.queries} query scenes of {args.scene_size}",
            flush=True,
        )
        report["protocols"] = bench_protocols(spec, args)
    report["peak_rss_bytes_after_protocols"] = peak_rss_bytes()
    print(f"metric memory: 1 vs {args.metric_images} images of {args.metric_size}", flush=True)
    report["metric_memory"] = bench_metrics(args)
    if args.bank_images:
        print(f"bank build memory: {args.bank_images} scenes, {args.bank_encoder}", flush=True)
        report["bank_build_memory"] = bank = bench_bank_build(args)
        print_bank(bank, args)
    report["environment"]["load_average_at_end"] = os.getloadavg()
    for name, r in report["protocols"].items():
        split = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in r["per_query_seconds"].items())
        print(f"{name}: mIoU {r['miou']:.4f}; ms per query image: {split}")
    for name, m in report["metric_memory"].items():
        ratio = m["ratio_many_to_one"]
        many = m[str(args.metric_images)]
        print(f"{name}: {ratio['pixels']:.0f}x pixels → state {ratio['state_bytes']:.2f}x "
              f"({many['state_bytes']} bytes), Python allocations peak {many['python_alloc_peak_bytes']} bytes, "
              "RSS MiB after images " + ", ".join(
                  f"{i}: {b / 2**20:.0f}" for i, b in many["rss_bytes_after_image"].items()))  # fmt: skip
    print(
        f"peak RSS after the protocols: {report['peak_rss_bytes_after_protocols'] / 2**20:.0f} MiB"
    )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
