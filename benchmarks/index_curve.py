"""Recall/latency curves of IVF-PQ configurations at 1M keys (issue 15, target 2).

Each configuration is a faiss ``index_factory`` string (what ``FaissIVFPQIndex`` builds,
plus OPQ rotations and HNSW coarse quantisers to compare), trained on the same seeded
sample and filled with the same float16 keys (upcast, as ``FaissIVFPQIndex`` adds them).
It is then searched with ``--queries`` queries (one 1024-patch image by default) at a
grid of ``nprobe`` × ``k_factor``; each point is the best of ``--repeats`` timed passes
and recall@k against exact search (``ExactIndex``, the torch oracle).

Keys: ``synthetic`` (clustered unit vectors, ``index.synthetic``) or ``patches``
(synthetic scenes encoded with a random-weight ViT at 448 px, every patch kept,
repeated with small noise up to ``--keys``; queries are patches of other scenes).

    python benchmarks/index_curve.py --threads 1 --dim 384 --configs default opq96
    python benchmarks/index_curve.py --threads 1 --source patches --configs default

Writes JSON and a markdown table next to it (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np
import torch
from _common import environment, set_threads, settings, write_report

from hbird import _optional
from hbird.index import ExactIndex, recall_at_k
from hbird.index.synthetic import clustered_unit_vectors
from hbird.index.tuning import sample_rows

DEFAULT_OUT = Path(__file__).parent / "results" / "index_curve.json"

CONFIGS = {
    "default": "IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "pq-full": "IVF{nlist},PQ{dim}x4fs,Refine(SQfp16)",
    "refine-float32": "IVF{nlist},PQ{half}x4fs,RFlat",
    "no-residual": "IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "pq-full-no-residual": "IVF{nlist},PQ{dim}x4fs,Refine(SQfp16)",
    "residual": "IVF{nlist},PQ{dim}x4fs,Refine(SQfp16)",
    "half-residual": "IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "pq-full-hnsw-coarse": "IVF{nlist}_HNSW32,PQ{dim}x4fs,Refine(SQfp16)",
    "pq-quarter": "IVF{nlist},PQ{quarter}x4fs,Refine(SQfp16)",
    "opq-quarter": "OPQ{quarter},IVF{nlist},PQ{quarter}x4fs,Refine(SQfp16)",
    "opq-half": "OPQ{half},IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "pcar-half": "PCAR{dim},IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "rr-half": "RR{dim},IVF{nlist},PQ{half}x4fs,Refine(SQfp16)",
    "hnsw-coarse": "IVF{nlist}_HNSW32,PQ{half}x4fs,Refine(SQfp16)",
    "hnsw-coarse-quarter": "IVF{nlist}_HNSW32,PQ{quarter}x4fs,Refine(SQfp16)",
}
"""Name → factory template; ``half``/``quarter`` are ``D/2``/``D/4`` sub-quantisers.
faiss's factory leaves ``by_residual`` off for fast-scan inner-product indexes (PQ codes
the keys, not their offsets from the list centroid), so ``*no-residual`` are the same
as the configs they name; ``BY_RESIDUAL`` turns it on."""

BY_RESIDUAL = {"residual", "half-residual"}
"""Configs built with ``by_residual`` on (``FaissIVFPQIndex``'s default)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--source", choices=["synthetic", "patches"], default="synthetic")
    parser.add_argument("--configs", nargs="+", default=["default", "opq-quarter"])
    parser.add_argument("--nlist", type=int, default=2048)
    parser.add_argument("--train-size", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--nprobes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--k-factors", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--opq-iterations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-threads", type=int, help="threads to build (default --threads)")
    parser.add_argument("--images", type=int, default=48, help="scenes encoded (patches)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--noise", type=float, default=0.02, help="copy noise norm (patches)")
    parser.add_argument(
        "--index-cache", type=Path, help="keep built indexes here and reuse them (same keys)"
    )
    return parser.parse_args(argv)


def synthetic_keys(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    keys = clustered_unit_vectors(args.keys, args.dim, n_clusters=200, seed=0).half()
    queries = clustered_unit_vectors(args.queries, args.dim, n_clusters=200, seed=1)
    return keys, queries


def patch_keys(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    """ViT patch features of synthetic scenes (random weights, 448 px), repeated with noise."""
    from hbird.data.synthetic import make_scenes
    from hbird.encoders import create_encoder, encode_batches

    name = {384: "vit_small_patch16_224", 768: "vit_base_patch16_224"}[args.dim]
    encoder = create_encoder(name).eval()  # random weights (no download)
    scenes = make_scenes(args.images + 2, seed=0, size=(448, 448), object_size=(80.0, 200.0))
    feats = encode_batches(encoder, [scene.image for scene in scenes], batch_size=4)

    def encode(i: int) -> torch.Tensor:
        return torch.nn.functional.normalize(feats[i].reshape(-1, args.dim).float(), dim=1)

    base = torch.cat([encode(i) for i in range(args.images)])  # (images · h·w, D)
    queries = torch.cat([encode(i) for i in range(args.images, args.images + 2)])
    gen = torch.Generator().manual_seed(0)
    keys = torch.empty(args.keys, args.dim, dtype=torch.float16)
    scale = args.noise / args.dim**0.5  # noise norm ~0.02: copies stay near-duplicates
    for start in range(0, args.keys, base.shape[0]):
        part = base[: args.keys - start]
        noisy = part + scale * torch.randn(part.shape, generator=gen) if start else part
        keys[start : start + part.shape[0]] = torch.nn.functional.normalize(noisy, dim=1)
    return keys, queries[: args.queries]


def run_config(
    name: str, args: argparse.Namespace, keys: torch.Tensor, queries: torch.Tensor, truth
) -> dict[str, Any]:
    faiss = _optional.require("faiss", "benchmarks/index_curve.py")
    dim = args.dim
    factory = CONFIGS[name].format(nlist=args.nlist, dim=dim, half=dim // 2, quarter=dim // 4)
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    base = faiss.downcast_index(index.base_index)
    rotated = isinstance(base, faiss.IndexPreTransform)
    ivf = faiss.extract_index_ivf(index)
    ivf = faiss.downcast_index(ivf)
    ivf.by_residual = name in BY_RESIDUAL
    if rotated:
        rotation = faiss.downcast_VectorTransform(base.chain.at(0))
        if isinstance(rotation, faiss.OPQMatrix):  # faiss's 50 iterations take too long here
            rotation.niter, rotation.max_train_points = args.opq_iterations, 32_768
    cached = cache_file(args, name, factory)
    if cached is not None and cached.with_suffix(".json").is_file():
        index = faiss.read_index(str(cached))
        built = json.loads(cached.with_suffix(".json").read_text())
        train_s, build_s = built["train_s"], built["build_s"]
        print(f"{name}: {factory} read from {cached} (built in {build_s:.0f} s)", flush=True)
    else:
        set_threads(args.build_threads or args.threads)
        start = time.perf_counter()
        rows = sample_rows(keys.shape[0], args.train_size, seed=0)
        index.train(np.ascontiguousarray(keys[rows].float().numpy()))
        train_s = time.perf_counter() - start
        for s in range(0, keys.shape[0], 1 << 16):
            index.add(np.ascontiguousarray(keys[s : s + (1 << 16)].float().numpy()))
        build_s = time.perf_counter() - start
        set_threads(args.threads)
        print(f"{name}: {factory} built in {build_s:.0f} s (train {train_s:.0f} s)", flush=True)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            faiss.write_index(index, str(cached))
            threads = args.build_threads or args.threads
            built = {"train_s": train_s, "build_s": build_s, "threads": threads}
            cached.with_suffix(".json").write_text(json.dumps(built))
    ivf = faiss.extract_index_ivf(index)
    rotated = isinstance(faiss.downcast_index(index.base_index), faiss.IndexPreTransform)
    q = np.ascontiguousarray(queries.numpy())
    index.search(q, args.k)  # warm-up: the first search pays one-off set-up costs
    coarse = faiss.downcast_index(ivf.quantizer)
    points = []
    for nprobe in args.nprobes:
        for k_factor in args.k_factors:
            base_params = faiss.SearchParametersIVF(nprobe=nprobe)
            if rotated:  # IndexRefine(IndexPreTransform(rotation, IVF)): refine on raw keys
                base_params = faiss.SearchParametersPreTransform(index_params=base_params)
            params = faiss.IndexRefineSearchParameters(
                k_factor=float(k_factor), base_index_params=base_params
            )
            stages = {
                "coarse": partial(coarse.search, q, nprobe),  # nearest lists only
                "first_pass": partial(  # coarse + fast-scan
                    index.base_index.search, q, args.k * k_factor, params=base_params
                ),
                "total": partial(index.search, q, args.k, params=params),  # + re-ranking
            }
            timed = {name: timings(stage, args.repeats) for name, stage in stages.items()}
            ids = stages["total"]()[1]
            recall = recall_at_k(torch.from_numpy(ids), truth)
            point = {"nprobe": nprobe, "k_factor": k_factor, "recall": recall}
            for name, (wall, cpu) in timed.items():  # min over the passes
                point[f"{name}_ms"], point[f"{name}_cpu_ms"] = min(wall), min(cpu)
            point["ms"], point["median_ms"] = min(timed["total"][0]), median(timed["total"][0])
            point["cpu_ms"] = min(timed["total"][1])
            point["load"] = os.getloadavg()[0]
            points.append(point)
            print(
                f"  nprobe {nprobe:3d} k_factor {k_factor:3d}: {point['ms']:7.1f} ms "
                f"(median {point['median_ms']:.0f}, cpu {point['cpu_ms']:.0f}: coarse "
                f"{point['coarse_cpu_ms']:.0f}, fast-scan "
                f"{point['first_pass_cpu_ms'] - point['coarse_cpu_ms']:.0f}, re-rank "
                f"{point['cpu_ms'] - point['first_pass_cpu_ms']:.0f})  recall@{args.k} "
                f"{recall:.4f}  load {point['load']:.1f}",
                flush=True,
            )
    return {"factory": factory, "train_s": train_s, "build_s": build_s, "points": points}


def cache_file(args: argparse.Namespace, name: str, factory: str) -> Path | None:
    """Where ``--index-cache`` keeps config ``name`` built on these keys (``None``: off)."""
    if args.index_cache is None:
        return None
    keys = f"{args.source}-{args.keys}x{args.dim}-images{args.images}-noise{args.noise}"
    build = f"{factory}-residual{int(name in BY_RESIDUAL)}-train{args.train_size}"
    return args.index_cache / f"{keys}-{re.sub(r'[^A-Za-z0-9]+', '_', build)}.faiss"


def timings(stage, repeats: int) -> tuple[list[float], list[float]]:
    """Wall and process-CPU milliseconds of ``repeats`` calls of ``stage``. On a shared
    machine the CPU time is the steadier of the two (with one thread it is close to the
    wall time the search would take alone)."""
    wall, cpu = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        stage()
        wall.append(1e3 * (time.perf_counter() - t))
        cpu.append(1e3 * (time.process_time() - c))
    return wall, cpu


def fastest_at(points: list[dict[str, Any]], recall: float) -> dict[str, Any] | None:
    """The point of least CPU time whose recall reaches ``recall`` (``None``: none does)."""
    good = [p for p in points if p["recall"] >= recall]
    return min(good, key=lambda p: p["cpu_ms"]) if good else None


def describe_point(p: dict[str, Any] | None) -> str:
    if p is None:
        return "not reached"
    return (
        f"{p['cpu_ms']:.0f} ms cpu, {p['ms']:.0f} wall (nprobe {p['nprobe']}, k_factor "
        f"{p['k_factor']}, {p['recall']:.3f}; coarse {p['coarse_cpu_ms']:.0f} + fast-scan "
        f"{p['first_pass_cpu_ms'] - p['coarse_cpu_ms']:.0f} + re-rank "
        f"{p['cpu_ms'] - p['first_pass_cpu_ms']:.0f})"
    )


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    loads = [p["load"] for r in report["configs"].values() for p in r["points"]]
    lines = [
        f"{s['keys']:,} × {s['dim']} float16 keys ({s['source']}), {s['queries']} queries, "
        f"k = {s['k']}, {s['threads']} thread(s), IVF{s['nlist']}, "
        f"{s['train_size']:,} training rows; min of {s['repeats']} passes per point, "
        f"process CPU time (steady under load) and wall time; load average "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}.",
        "",
        "| config | factory | build | fastest at recall ≥ 0.9 | fastest at ≥ 0.95 | best recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["configs"].items():
        cells = [describe_point(fastest_at(r["points"], target)) for target in (0.9, 0.95)]
        top = max(p["recall"] for p in r["points"])
        lines.append(
            f"| {name} | `{r['factory']}` | {r['build_s']:.0f} s | {cells[0]} | {cells[1]} | "
            f"{top:.3f} |"
        )
    lines += ["", f"Exact (torch, same thread count): {report['exact_ms']:.0f} ms.", ""]
    for name, r in report["configs"].items():  # the curve: recall / CPU ms per point
        k_factors = sorted({p["k_factor"] for p in r["points"]})
        lines += [
            f"`{name}`: recall@{s['k']} / CPU ms",
            "",
            "| nprobe | " + " | ".join(f"k_factor {k}" for k in k_factors) + " |",
            "|---|" + "---|" * len(k_factors),
        ]
        for nprobe in sorted({p["nprobe"] for p in r["points"]}):
            row = {p["k_factor"]: p for p in r["points"] if p["nprobe"] == nprobe}
            cells = [f"{row[k]['recall']:.3f} / {row[k]['cpu_ms']:.0f}" for k in k_factors]
            lines.append(f"| {nprobe} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    keys, queries = (synthetic_keys if args.source == "synthetic" else patch_keys)(args)
    exact = ExactIndex(args.dim).fill(keys)
    t = time.perf_counter()
    truth = exact.search(queries, args.k)[1]
    exact_ms = 1e3 * (time.perf_counter() - t)
    del exact
    print(f"exact: {exact_ms:.0f} ms", flush=True)
    report: dict[str, Any] = {
        "settings": settings(args),
        "environment": environment(),
        "exact_ms": exact_ms,
        "configs": {},
    }
    for name in args.configs:
        report["configs"][name] = run_config(name, args, keys, queries, truth)
        write_report(report, args.out)  # a partial curve survives a later failure
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
