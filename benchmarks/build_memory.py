"""Peak memory of an index build: RSS growth over the keys themselves, in a child process.

Each build runs in a fresh ``python`` child, so one build's peak never hides another's.
The child makes ``N × D`` float16 keys a few rows at a time (no float32 copy of them),
notes its RSS, runs ``index.fill(keys)`` (what the predictor does with a bank in memory)
and reports the peak RSS growth (``ru_maxrss``) and the RSS still held once built.
``--src`` points the child at another hbird checkout, to compare versions:

    python benchmarks/build_memory.py --kinds exact ivfpq
    python benchmarks/build_memory.py --kinds exact ivfpq --src /path/to/other/src
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from _common import child_row, environment, settings, write_report

DEFAULT_OUT = Path(__file__).parent / "results" / "build_memory.json"

CHILD = r"""
import json, resource, sys, torch
from hbird.index import create_index
n, dim, kind, params = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
torch.set_num_threads(1)
try:
    import faiss
    faiss.omp_set_num_threads(1)
except ImportError:
    pass
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()
gen = torch.Generator().manual_seed(0)
keys = torch.empty(n, dim, dtype=torch.float16)
for start in range(0, n, 1 << 16):
    block = torch.randn(min(1 << 16, n - start), dim, generator=gen)
    keys[start : start + block.shape[0]] = torch.nn.functional.normalize(block, dim=1)
del block
index = create_index(kind, dim, expected_size=n, **params)
before = rss()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
index.fill(keys)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({
    "hbird": __import__("hbird").__file__,
    "keys_bytes": keys.numel() * 2,
    "rss_before_build": before,
    # below the key generation's own peak the build's is not seen: report that bound
    "peak_growth_bytes": peak - before,
    "peak_is_generation_bound": peak <= peak_before,
    "held_after_build_bytes": rss() - before,
    "index": {k: v for k, v in index.describe().items() if k != "ntotal"},
}))
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--kinds", nargs="+", default=["exact", "ivfpq"])
    parser.add_argument(
        "--ivfpq-params",
        default='{"nlist": 1024, "train_size": 65536}',
        help="JSON options of the ivfpq build (small k-means: memory, not quality, is measured)",
    )
    parser.add_argument("--src", type=Path, default=Path(__file__).parents[1] / "src")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def build_in_child(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    params = args.ivfpq_params if kind == "ivfpq" else "{}"
    env = {**os.environ, "PYTHONPATH": str(args.src)}
    argv = [sys.executable, "-c", CHILD, str(args.keys), str(args.dim), kind, params]
    return child_row(argv, env)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    report: dict[str, Any] = {"settings": settings(args), "environment": environment()}
    for kind in args.kinds:
        result = build_in_child(args, kind)
        report[kind] = result
        if "error" in result:
            print(f"{kind}: {result['error']}")
            continue
        print(
            f"{kind}: peak +{result['peak_growth_bytes'] / 2**30:.2f} GiB, held "
            f"+{result['held_after_build_bytes'] / 2**30:.2f} GiB over "
            f"{result['keys_bytes'] / 2**30:.2f} GiB of keys",
            flush=True,
        )
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
