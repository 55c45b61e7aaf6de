"""Scaling over processes: bank build, evaluation and sharded search on 1, 2 and 4 ranks.

Each world size is one ``torchrun --standalone --nproc-per-node N`` launch of this file
(gloo on the CPU, one torch thread per rank). Every rank measures, and rank 0 collects:

- bank build: prompt images encoded per second (``InContextPredictor.build_bank`` under
  the group: the ranks split the (image, epoch) items, rank 0 assembles the shards);
- evaluation: query images scored per second (``score_queries``: the ranks split the
  queries, metric states summed);
- sharded search over ``--keys`` float16 keys (``ShardedIndex`` over exact slices): query
  rows searched per second, and each rank's index bytes and peak RSS (should fall as 1/N).

Scaling efficiency = throughput at N / (N × throughput at 1). On a machine with fewer
cores than ranks, CPU-bound work cannot scale; the memory per rank is the figure that
must hold.

    python benchmarks/scale.py                          # ~5 min on 2 loaded cores
    python benchmarks/scale.py --ranks 1 2 --keys 100000 --encoders test_vit

Writes JSON to ``benchmarks/results/scale.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import environment, peak_rss_bytes, rss_bytes, settings, write_report

ENCODERS = {"test_vit": 64, "vit_small_patch16_224": 224}  # encoder → image size


def _synchronised(fn):
    from hbird import distributed

    distributed.barrier()
    start = time.perf_counter()
    result = fn()
    distributed.barrier()
    return time.perf_counter() - start, result


def measure_encoder(encoder: str, size: int, args: argparse.Namespace, work: Path) -> dict:
    """Bank build and evaluation throughput with ``encoder`` (random weights)."""
    from hbird.data.datasets import create_dataset
    from hbird.data.pairs import DatasetPairs
    from hbird.eval.scoring import new_metric, score_queries
    from hbird.predictor import InContextPredictor

    prompt = create_dataset(f"synthetic:n={args.images}:seed=0:classes=4:size={size}")
    queries = create_dataset(f"synthetic:n={args.queries}:seed=1:classes=4:size={size}")
    predictor = InContextPredictor(
        encoder=encoder, pretrained=False, image_size=size, progress=False, index="exact"
    )
    bank = work / f"bank_{encoder}"
    build, _ = _synchronised(
        lambda: predictor.build_bank(DatasetPairs(prompt), prompt.label_spec, bank)
    )
    loaded = InContextPredictor.load(bank, encoder=predictor.encoder_, progress=False)
    metric = new_metric(loaded.label_spec_)
    score, _ = _synchronised(
        lambda: score_queries(loaded.predict_dense, queries, metric, batch_size=4, progress=False)
    )
    return {"build_images_per_s": len(prompt) / build, "eval_images_per_s": len(queries) / score}


def worker(args: argparse.Namespace) -> None:
    """One rank of one launch: measure, then rank 0 writes ``args.result``."""
    from hbird import distributed
    from hbird.index import ExactIndex
    from hbird.index.sharded import ShardedIndex, slice_bounds

    torch.set_num_threads(1)
    distributed.init_from_env()
    me, world = distributed.rank(), distributed.world_size()
    work = Path(args.work) / f"ranks{world}"
    rows = {e: measure_encoder(e, ENCODERS[e], args, work) for e in args.encoders}
    # sharded search: this rank's slice of one global key set, generated in fixed blocks
    start, stop = slice_bounds(args.keys, me, world)
    before = rss_bytes()
    local = ExactIndex(args.dim)
    block = 8192  # small generation blocks: RSS growth ≈ the index itself
    for first in range(start - start % block, stop, block):
        gen = torch.Generator().manual_seed(first)
        keys = torch.nn.functional.normalize(torch.randn(block, args.dim, generator=gen), dim=1)
        lo, hi = max(start, first), min(stop, first + block)
        local.add(keys[lo - first : hi - first].half())
    index = ShardedIndex(local, start, args.keys)
    grown = rss_bytes() - before
    q_lo, q_hi = slice_bounds(args.search_queries, me, world)
    gen = torch.Generator().manual_seed(1)
    queries_all = torch.randn(args.search_queries, args.dim, generator=gen)
    index.search(queries_all[q_lo : q_lo + 1], 30)  # warm-up
    search, _ = _synchronised(lambda: index.search(queries_all[q_lo:q_hi], 30))
    mine = {
        "rank": me,
        "index_bytes": local.ntotal * args.dim * 2,
        "rss_growth_bytes": grown,
        "peak_rss_bytes": peak_rss_bytes(),
        "search_rows_per_s": args.search_queries / search,
        "throughput": rows,
    }
    everyone = distributed.all_gather_object(mine)
    if me == 0:
        Path(args.result).write_text(json.dumps(everyone))
    distributed.cleanup_distributed()


def launch(args: argparse.Namespace, ranks: int, work: Path) -> list[dict]:
    result = work / f"result_{ranks}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           __file__, "--worker", "--result", str(result), "--work", str(work),
           "--images", str(args.images), "--queries", str(args.queries), "--keys", str(args.keys),
           "--dim", str(args.dim), "--search-queries", str(args.search_queries),
           "--encoders", *args.encoders]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def summarise(per_world: dict[int, list[dict]]) -> list[dict]:
    """One row per (measure, world size): throughput, efficiency, memory per rank."""
    base = per_world[min(per_world)]
    rows = []
    for world, ranks in per_world.items():
        r0 = ranks[0]
        for encoder in r0["throughput"]:
            for what in ("build_images_per_s", "eval_images_per_s"):
                value = r0["throughput"][encoder][what]
                one = base[0]["throughput"][encoder][what]
                rows.append({"measure": f"{what} {encoder}", "ranks": world, "value": value,
                             "efficiency": value / (world * one)})  # fmt: skip
        value, one = r0["search_rows_per_s"], base[0]["search_rows_per_s"]
        rows.append({"measure": "sharded search rows/s", "ranks": world, "value": value,
                     "efficiency": value / (world * one),
                     "index_MiB_per_rank": max(r["index_bytes"] for r in ranks) / 2**20,
                     "rss_growth_MiB_per_rank": max(r["rss_growth_bytes"] for r in ranks) / 2**20,
                     "peak_rss_MiB_per_rank": max(r["peak_rss_bytes"] for r in ranks) / 2**20})  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--encoders", nargs="+", default=list(ENCODERS), choices=list(ENCODERS))
    parser.add_argument("--images", type=int, default=16, help="prompt images")
    parser.add_argument("--queries", type=int, default=16, help="query images")
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys of the sharded search")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--search-queries", type=int, default=1024, help="query rows searched")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "scale.json"
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        per_world = {n: launch(args, n, Path(tmp)) for n in args.ranks}
    rows = summarise(per_world)
    for row in rows:
        print(json.dumps(row))
    write_report({"environment": environment(), "settings": settings(args), "rows": rows,
                  "per_rank": per_world}, args.out)  # fmt: skip


if __name__ == "__main__":
    main()
