"""Upsampling + argmax of one query image's soft labels: the ``(C, H, W)`` map then
``max(dim=0)`` (``upsample``, the old decode) against the tiled ``upsample_argmax``.

The soft labels are eq.-1 outputs as ``benchmarks/predict.py`` makes them: per patch, the
softmax (β = ``--temperature``) over k random cosines of k one-hot values with random
classes. For each class count and thread count, ``--rounds`` interleaved rounds time both
ways (min and median) and check that labels and confidences are bit for bit the same.

    python benchmarks/decode.py                        # ~1 min
    python benchmarks/decode.py --classes 21 150 --threads 1 2 --grid 32 --size 512

Writes JSON to ``benchmarks/results/decode.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, set_threads, settings, write_report

from hbird.decode import aggregate, softmax_over_neighbours, upsample, upsample_argmax

DEFAULT_OUT = Path(__file__).parent / "results" / "decode.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[21, 150])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--grid", type=int, default=32, help="patches per side (1024 = 32²)")
    parser.add_argument("--size", type=int, default=512, help="output side in pixels")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def soft_labels(args: argparse.Namespace, classes: int) -> torch.Tensor:
    """``(grid, grid, C)`` eq.-1 outputs over random neighbours."""
    gen = torch.Generator().manual_seed(classes)
    patches = args.grid * args.grid
    cosines = 0.5 + 0.05 * torch.randn(patches, args.k, generator=gen)
    weights = softmax_over_neighbours(cosines, args.temperature)
    labels = torch.randint(0, classes, (patches, args.k), generator=gen)
    values = torch.nn.functional.one_hot(labels, classes).float()  # (P, k, C)
    return aggregate(weights, values).reshape(args.grid, args.grid, classes)


def seconds(run: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def bench(args: argparse.Namespace, classes: int, threads: int) -> dict[str, Any]:
    set_threads(threads)
    soft, size = soft_labels(args, classes), (args.size, args.size)
    ways = {
        "map_then_max": lambda: upsample(soft, size).max(dim=0),
        "tiled": lambda: upsample_argmax(soft, size),
    }
    for run in ways.values():  # warm-up (and the tiled path's one-off check)
        run()
    times: dict[str, list[float]] = {name: [] for name in ways}
    outs: dict[str, Any] = {}
    for _ in range(args.rounds):
        for name, run in ways.items():
            t, outs[name] = seconds(run)
            times[name].append(t)
    (v0, l0), (v1, l1) = outs["map_then_max"], outs["tiled"]
    row: dict[str, Any] = {"classes": classes, "threads": threads}
    for name, ts in times.items():
        row[f"{name}_min_ms"] = round(1e3 * min(ts), 2)
        row[f"{name}_median_ms"] = round(1e3 * statistics.median(ts), 2)
    row["speedup_min"] = round(min(times["map_then_max"]) / min(times["tiled"]), 2)
    row["speedup_median"] = round(
        statistics.median(times["map_then_max"]) / statistics.median(times["tiled"]), 2
    )
    row["identical"] = bool(torch.equal(v0, v1) and torch.equal(l0, l1))
    print(
        f"C={classes:4d} threads={threads}: map+max {row['map_then_max_min_ms']:.1f} "
        f"({row['map_then_max_median_ms']:.1f}) ms, tiled {row['tiled_min_ms']:.1f} "
        f"({row['tiled_median_ms']:.1f}) ms, min (median); identical {row['identical']}",
        flush=True,
    )
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [bench(args, c, t) for t in args.threads for c in args.classes]
    report = {"config": settings(args), "environment": environment(), "rows": rows}
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
