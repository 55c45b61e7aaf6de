"""Benchmark the nearest-neighbour backends on clustered synthetic keys.

For each size, every backend is built and searched in this process next to the torch
exact index, and reported both in absolute numbers and as ratios against it:

- build time (``add`` plus one warm-up query, so lazy builds such as ScaNN's count),
- search time per query (best of ``--repeats`` passes over all queries),
- recall@k against the exact top-k,
- memory: the saved index's size on disk and the process RSS growth while building.

    python benchmarks/index.py                       # ~1-2 min on 2 cores
    python benchmarks/index.py --sizes 1000000 --dim 384 --backends exact flat ivfpq

Writes JSON to ``benchmarks/results/index.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, rss_bytes, set_threads, settings, write_report

from hbird import _optional
from hbird.index import INDEXES, ExactIndex, VectorIndex, create_index, recall_at_k
from hbird.index.synthetic import clustered_unit_vectors

DEFAULT_OUT = Path(__file__).parent / "results" / "index.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000, 200_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--clusters", type=int, default=50)
    parser.add_argument(
        "--spread", type=float, default=0.75, help="cluster noise (see synthetic.py)"
    )
    parser.add_argument("--float16", action="store_true", help="store keys as float16")
    parser.add_argument("--backends", nargs="+", default=["flat", "ivfpq", "hnsw", "scann"])
    parser.add_argument("--repeats", type=int, default=3, help="search passes; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def measure(
    index: VectorIndex, keys: torch.Tensor, queries: torch.Tensor, k: int, repeats: int
) -> tuple[dict[str, Any], torch.Tensor]:
    """Build ``index`` on ``keys`` and search ``queries``; answer numbers and the ids."""
    gc.collect()
    rss_before = rss_bytes()
    start = time.perf_counter()
    index.add(keys)
    index.search(queries[:1], k)  # warm-up; triggers lazy builds
    build_s = time.perf_counter() - start
    rss_delta = rss_bytes() - rss_before
    search_s = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        _, ids = index.search(queries, k)
        search_s = min(search_s, time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        saved = folder_bytes(index.save(Path(tmp) / "index"))
    numbers = {
        "build_s": round(build_s, 4),
        "search_ms_per_query": round(1000 * search_s / len(queries), 5),
        "saved_bytes": saved,
        "rss_delta_bytes": rss_delta,
    }
    return numbers, ids


def _line(numbers: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in numbers.items())


def bench_size(args: argparse.Namespace, n: int) -> dict[str, Any]:
    keys = clustered_unit_vectors(n, args.dim, args.clusters, args.spread, seed=0)
    queries = clustered_unit_vectors(args.queries, args.dim, args.clusters, args.spread, seed=1)
    if args.float16:
        keys = keys.half()
    exact = ExactIndex(args.dim)
    base, exact_ids = measure(exact, keys, queries, args.k, args.repeats)
    results: dict[str, Any] = {"exact": {**exact.describe(), **base, f"recall@{args.k}": 1.0}}
    print(f"  exact  {_line(base)}", flush=True)
    del exact
    for name in args.backends:
        module = "scann" if name == "scann" else "faiss"
        if not _optional.is_available(module):
            results[name] = {"skipped": f"{module} is not installed"}
            continue
        index = create_index(name, args.dim, expected_size=n)
        numbers, ids = measure(index, keys, queries, args.k, args.repeats)
        results[name] = {
            **index.describe(),
            **numbers,
            f"recall@{args.k}": round(recall_at_k(ids, exact_ids), 4),
            "vs_exact": {
                "build_time": round(numbers["build_s"] / base["build_s"], 2),
                "search_speedup": round(
                    base["search_ms_per_query"] / numbers["search_ms_per_query"], 2
                ),
                "saved_size": round(numbers["saved_bytes"] / base["saved_bytes"], 2),
            },
        }
        del index
        recall = results[name][f"recall@{args.k}"]
        speedup = results[name]["vs_exact"]["search_speedup"]
        print(f"  {name:6s} recall={recall} speedup={speedup}x  {_line(numbers)}", flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    unknown = set(args.backends) - set(INDEXES)
    if unknown:
        raise SystemExit(f"unknown backends {sorted(unknown)}; choose from {list(INDEXES)}")
    set_threads(args.threads)
    report: dict[str, Any] = {"config": settings(args), "environment": environment(), "sizes": {}}
    for n in args.sizes:
        print(f"N={n} dim={args.dim} queries={args.queries} k={args.k}", flush=True)
        report["sizes"][str(n)] = bench_size(args, n)
    report["environment"]["load_average_at_end"] = os.getloadavg()
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
