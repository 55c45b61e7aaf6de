"""Exact search: torch (``ExactIndex``), faiss's kNN on the same keys, and faiss flat.

Keys ``(N, D)`` float16 (as banks store them), queries in images of ``P`` patches; each
variant searches the same ``images × P`` queries for ``k`` neighbours, ``--batch``
images per call (what the predictor does with a batch of images):

- ``torch``: ``ExactIndex`` as configured by default (heap selection with faiss installed);
- ``topk``: ``ExactIndex(selection="topk")``: ``torch.topk`` per chunk + merge (the
  oracle; the default before heap selection);
- ``faiss``: ``ExactIndex(backend="faiss")``: the same float16 keys, each chunk
  converted to float32 and scored by ``faiss.knn`` (BLAS sgemm + heap top-k);
- ``faiss flat``: ``faiss.IndexFlatIP`` over a float32 copy of the keys, faiss's own
  defaults (what open-hummingbird-eval's exact mode does);
- ``before``: ``ExactIndex``'s search before preallocated buffers, one image per call
  (re-implemented here as the baseline of the previous change; ``--variants before``);
- ``bf16 x2``, ``bf16``, ``bf16 x8``: ``ExactIndex(scoring="bf16")``, the certified bf16
  first pass (``index.certified``) with 2 (4, the default; 8) candidates per neighbour, re-scored in
  float32, and a float32 search of the queries it cannot certify: exact. The JSON has
  the certified share of queries (``certified``) and the candidates per query.

Keys: ``--source synthetic`` (clustered, with duplicates), ``patches``: synthetic
scenes at 448 px through a random-weight ViT (``index_curve.patch_keys``, unit-norm,
every patch of ``ceil(keys / 784)`` scenes; queries are the patches of two other scenes,
so ``--images`` <= 2), or ``scenes``: issue 15's end-to-end features, raw as a bank holds
them (``ceil(keys / 784)`` prompt scenes and ``--images`` query scenes at 448 px,
5 classes, seed 0, random-weight ViT-S/16 seeded 0, float16 keys), encoded once and
kept in ``--cache`` (safetensors).

Runs are interleaved and repeated; the JSON has every time, min and median, the ratios
to the first variant, and each variant's agreement with it: ids equal (``torch.equal``),
recall@k and the largest score difference.

    python benchmarks/exact_search.py --threads 1                     # 784 x 156,800 x 384
    python benchmarks/exact_search.py --threads 1 --keys 1000000 --patches 1024 --images 1
    python benchmarks/exact_search.py --threads 2 --source scenes --images 10 --batch 10 \
        --cache /tmp/exact/scenes.safetensors --variants torch topk "faiss flat" bf16
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import report_results, set_threads

from hbird.index import ExactIndex, FaissFlatIndex, recall_at_k

DEFAULT_OUT = Path(__file__).parent / "results" / "exact_search.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=156_800, help="N (200 images × 784)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--patches", type=int, default=784, help="queries per image (448²/16²)")
    parser.add_argument("--images", type=int, default=8, help="query images per run")
    parser.add_argument("--batch", type=int, default=8, help="images per search call")
    parser.add_argument("--variants", nargs="+", default=["torch", "faiss", "faiss flat"])
    parser.add_argument("--source", choices=["synthetic", "patches", "scenes"], default="synthetic")
    parser.add_argument("--cache", type=Path, default=None, help="--source scenes: features file")
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


def scene_features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw ViT-S/16 patch features (random weights) of issue 15's synthetic scenes: keys
    ``(keys, 384)`` float16 of the prompt scenes, queries ``(images · 784, 384)`` float32
    of the query scenes; read from / written to ``args.cache`` if given."""
    from safetensors.torch import load_file

    from hbird.data.synthetic import make_scenes
    from hbird.encoders import create_encoder, encode_batches
    from hbird.io.files import save_tensors

    if args.cache is not None and args.cache.is_file():
        tensors = load_file(str(args.cache))
        if (
            tensors["keys"].shape[0] >= args.keys
            and tensors["queries"].shape[0] >= args.images * args.patches
        ):
            return tensors["keys"][: args.keys], tensors["queries"][: args.images * args.patches]
    prompt = math.ceil(args.keys / args.patches)
    scenes = make_scenes(prompt + args.images, seed=0, num_classes=5, size=(448, 448))
    torch.manual_seed(0)
    encoder = create_encoder("vit_small_patch16_224").eval()
    feats = encode_batches(encoder, [scene.image for scene in scenes], batch_size=4, progress=True)
    flat = [f.reshape(-1, f.shape[-1]) for f in feats]
    keys = torch.cat(flat[:prompt])[: args.keys].half()
    queries = torch.cat(flat[prompt:]).float()
    if args.cache is not None:
        save_tensors(args.cache, {"keys": keys, "queries": queries})
    return keys, queries


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    if args.source == "patches":
        if args.patches != 784 or args.images > 2:
            raise SystemExit("--source patches: 784 patches per image, --images at most 2")
        from index_curve import patch_keys

        scenes = math.ceil(args.keys / args.patches)
        setting = argparse.Namespace(keys=args.keys, dim=args.dim, images=scenes, noise=0.02,
                                     queries=args.images * args.patches)  # fmt: skip
        keys, queries = patch_keys(setting)
    elif args.source == "scenes":
        keys, queries = scene_features(args)
    else:
        keys = clustered(args.keys, args.dim, args.seed).half()
        queries = clustered(args.images * args.patches, args.dim, args.seed + 1)
    images = list(queries.split(args.patches))
    k = args.k
    indexes = {
        "torch": lambda: ExactIndex(args.dim).fill(keys),
        "topk": lambda: ExactIndex(args.dim, selection="topk").fill(keys),
        "faiss": lambda: ExactIndex(args.dim, backend="faiss").fill(keys),
        "faiss flat": lambda: FaissFlatIndex(args.dim).fill(keys),
        "before": lambda: ExactIndex(args.dim).fill(keys),
        "bf16 x2": lambda: ExactIndex(args.dim, scoring="bf16", shortlist=2).fill(keys),
        "bf16": lambda: ExactIndex(args.dim, scoring="bf16").fill(keys),
        "bf16 x8": lambda: ExactIndex(args.dim, scoring="bf16", shortlist=8).fill(keys),
    }
    built = {name: indexes[name]() for name in args.variants}

    def batched(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        if name == "before":
            parts = [search_before(built[name], q, k) for q in images]
        else:
            parts = []
            for start in range(0, len(images), args.batch):
                parts.append(built[name].search(torch.cat(images[start : start + args.batch]), k))
                last = getattr(built[name], "last_search", None)
                if last:
                    certificates[name]["queries"] += last["queries"]
                    certificates[name]["certified"] += last["certified"]
                    certificates[name]["candidates"] = last["candidates"]
        return torch.cat([s for s, _ in parts]), torch.cat([i for _, i in parts])

    certificates = {name: {"queries": 0, "certified": 0, "candidates": 0} for name in args.variants}
    results: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    seconds: dict[str, list[float]] = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name in args.variants:  # interleaved
            start = time.perf_counter()
            results[name] = batched(name)
            seconds[name].append(time.perf_counter() - start)
            print(f"{name:<12} {seconds[name][-1]:7.3f} s", flush=True)
    first = args.variants[0]
    ref_sims, ref_ids = results[first]
    flops = 2.0 * len(queries) * args.keys * args.dim
    report: dict[str, Any] = {}
    for name in args.variants:
        sims, ids = results[name]
        t = seconds[name]
        report[name] = {
            "seconds": t,
            "min": min(t),
            "median": statistics.median(t),
            "per_image_ms_min": 1e3 * min(t) / args.images,
            "gflops_min": flops / min(t) / 1e9,
            f"min_over_{first}": min(t) / min(seconds[first]),
            f"median_over_{first}": statistics.median(t) / statistics.median(seconds[first]),
            f"ids_equal_to_{first}": torch.equal(ids, ref_ids) and torch.equal(sims, ref_sims),
            f"recall_vs_{first}": recall_at_k(ids, ref_ids),
            f"max_score_diff_vs_{first}": float((sims - ref_sims).abs().max()),
        }
        if certificates[name]["queries"]:
            done = certificates[name]
            report[name]["certified"] = done["certified"] / done["queries"]
            report[name]["candidates_per_query"] = done["candidates"]
        print(
            f"{name:<12} min {min(t):7.3f} s  median {statistics.median(t):7.3f} s  "
            f"x{report[name][f'min_over_{first}']:.3f} of {first}  "
            f"recall {report[name][f'recall_vs_{first}']:.4f}  "
            f"identical {report[name][f'ids_equal_to_{first}']}"
            + (
                f"  certified {report[name]['certified']:.4f}"
                if "certified" in report[name]
                else ""
            )
        )
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return report_results(args, run(args))


if __name__ == "__main__":
    main()
