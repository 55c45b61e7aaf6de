"""Exact search (``ExactIndex``): this version against the one before it, on equal work.

Keys ``(N, D)`` float16 (as banks store them), queries in images of ``P`` patches; each
variant searches the same ``images × P`` queries for ``k`` neighbours:

- ``before``: ``ExactIndex``'s search before preallocated buffers (a score matrix and a
  float32 copy of a key chunk allocated per query chunk × key chunk), one image per call,
  as the predictor searched (re-implemented here as the baseline);
- ``after, per image``: this version, one image per call;
- ``after, batched``: this version, ``--batch`` images per call (what the predictor now
  does with a batch of images).

Runs are interleaved (before, after, batched, before, ...) and repeated; the JSON has
every time, min and median, and the ratios of the minima and medians to ``before``. The
neighbours and scores of every variant are compared with ``before`` (``torch.equal``:
the same ids in the same order, ties included).

    python benchmarks/exact_search.py --threads 1                     # 784 x 156,800 x 384
    python benchmarks/exact_search.py --keys 39200 --images 4 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, set_threads, write_report

from hbird.index import ExactIndex

DEFAULT_OUT = Path(__file__).parent / "results" / "exact_search.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=156_800, help="N (200 images × 784)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--patches", type=int, default=784, help="queries per image (448²/16²)")
    parser.add_argument("--images", type=int, default=8, help="query images per run")
    parser.add_argument("--batch", type=int, default=8, help="images per call, batched variant")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def search_before(index: ExactIndex, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``ExactIndex._search`` before this change: query chunks outer, a new score matrix
    and a new float32 key chunk for every (query chunk, key chunk) pair."""
    sims = torch.empty(q.shape[0], k)
    ids = torch.empty(q.shape[0], k, dtype=torch.int64)
    for q_start in range(0, q.shape[0], index.query_chunk_size):
        chunk = q[q_start : q_start + index.query_chunk_size].to(torch.float32)
        best_sims = torch.full((chunk.shape[0], k), float("-inf"))
        best_ids = torch.full((chunk.shape[0], k), -1, dtype=torch.int64)
        for first_id, keys in index._key_chunks():
            scores = chunk @ keys.to(torch.float32).T
            chunk_sims, chunk_ids = scores.topk(min(k, keys.shape[0]), dim=1)
            merged_sims = torch.cat([best_sims, chunk_sims], dim=1)
            merged_ids = torch.cat([best_ids, chunk_ids + first_id], dim=1)
            best_sims, order = merged_sims.topk(k, dim=1)
            best_ids = merged_ids.gather(1, order)
        rows = slice(q_start, q_start + chunk.shape[0])
        sims[rows], ids[rows] = best_sims, best_ids
    return sims, ids


def clustered(n: int, dim: int, seed: int, centres: int = 64) -> torch.Tensor:
    """``n`` unit vectors around ``centres`` seeded directions (patch features cluster),
    with exact duplicates (flat image regions give equal keys, so ties are tested)."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(centres, dim, generator=gen)
    x = base[torch.randint(centres, (n,), generator=gen)] + 0.5 * torch.randn(n, dim, generator=gen)
    x[1::7] = x[0::7][: x[1::7].shape[0]]  # every 7th row repeats its neighbour
    return torch.nn.functional.normalize(x, dim=1)


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    keys = clustered(args.keys, args.dim, args.seed).half()
    queries = clustered(args.images * args.patches, args.dim, args.seed + 1)
    images = list(queries.split(args.patches))
    index = ExactIndex(args.dim)
    index.add(keys)
    k = args.k

    def per_image_before():
        return [search_before(index, q, k) for q in images]

    def per_image_after():
        return [index.search(q, k) for q in images]

    def batched_after():
        out = []
        for start in range(0, len(images), args.batch):
            sims, ids = index.search(torch.cat(images[start : start + args.batch]), k)
            out.extend(zip(sims.split(args.patches), ids.split(args.patches)))
        return out

    variants = {
        "before": per_image_before,
        "after, per image": per_image_after,
        "after, batched": batched_after,
    }
    results: dict[str, list] = {name: [] for name in variants}
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved
            start = time.perf_counter()
            results[name] = fn()
            seconds[name].append(time.perf_counter() - start)
            print(f"{name:<18} {seconds[name][-1]:7.3f} s", flush=True)
    reference = results["before"]
    flops = 2.0 * len(queries) * args.keys * args.dim
    report: dict[str, Any] = {}
    for name in variants:
        same = all(
            torch.equal(s, rs) and torch.equal(i, ri)
            for (s, i), (rs, ri) in zip(results[name], reference)
        )
        t = seconds[name]
        report[name] = {
            "seconds": t,
            "min": min(t),
            "median": statistics.median(t),
            "per_image_ms_min": 1e3 * min(t) / args.images,
            "gflops_min": flops / min(t) / 1e9,
            "min_over_before": min(t) / min(seconds["before"]),
            "median_over_before": statistics.median(t) / statistics.median(seconds["before"]),
            "identical_to_before": same,
        }
        print(
            f"{name:<18} min {min(t):7.3f} s  median {statistics.median(t):7.3f} s  "
            f"x{report[name]['min_over_before']:.3f} of before  identical {same}"
        )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "environment": environment(),
        "results": run(args),
    }
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
