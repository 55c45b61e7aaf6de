"""Per-image lookup at 1M keys: hbird's index backends side by side (issue 15, target 2).

One search = the patches of one query image against ``--keys`` float16 keys, k = 30.
Every index is built once (``create_index(kind, ...).fill``) and kept in ``--index-cache``;
the search settings of a ``--grid`` are then timed in interleaved rounds (each round
runs every point once, so load changes on a shared machine hit all of them alike), and
each point reports min and median wall and process-CPU milliseconds over the rounds,
recall@30 against exact search (``ExactIndex``), build time and payload size.

Query sets (``--source``):

- ``synthetic``: keys are clustered unit vectors (200 blobs, ``index.synthetic``), as in
  ``index_curve.py``. ``spread`` queries are drawn from all 200 blobs (uncorrelated, the
  earlier curves' setting); ``image`` queries from 8 of them, like the patches of one
  image, which cover a few segments; ``--image-seeds`` adds one such image per seed
  (``image<seed>``): recall varies with the 8 blobs drawn, so one image's recall is a
  sample, not the expectation.
- ``patches``: ViT patch features of synthetic scenes repeated with noise (``index_curve
  .patch_keys``); ``two`` is the first 1024 patches of two other scenes (the earlier
  curves' queries), ``one`` the 784 patches of one scene.

    python benchmarks/lookup.py --source synthetic --dim 384 --grid '{"ivfmm:nlist=1000":
        {"nprobe": [4, 8]}, "ivfpq": {"nprobe": [8], "k_factor": [2]}}'

Writes JSON and a markdown table next to it (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from statistics import mean, median, stdev
from typing import Any

import torch
from _common import environment, set_threads, settings, write_report
from index_curve import patch_keys

from hbird.index import ExactIndex, create_index, load_index, recall_at_k
from hbird.index.synthetic import clustered_queries, clustered_unit_vectors

DEFAULT_OUT = Path(__file__).parent / "results" / "lookup.json"
DEFAULT_GRID = {
    "ivfpq": {"nprobe": [8, 16], "k_factor": [2, 4]},
    "ivfmm:nlist=1000": {"nprobe": [4, 8, 16], "k_factor": [1]},
}
"""Index spec (``kind`` or ``kind:name=value:...`` build parameters) → search settings."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--source", choices=["synthetic", "patches"], default="synthetic")
    parser.add_argument("--images", type=int, default=24, help="scenes encoded (patches)")
    parser.add_argument("--noise", type=float, default=0.02, help="copy noise norm (patches)")
    parser.add_argument("--grid", type=json.loads, default=DEFAULT_GRID)
    parser.add_argument("--query-sets", nargs="+", help="default: all of the source's")
    parser.add_argument(
        "--image-seeds",
        type=int,
        nargs="*",
        default=[],
        help="synthetic: one more image-like query set per seed (image<seed>)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-threads", type=int, help="threads to build (default --threads)")
    parser.add_argument("--data-cache", type=Path, help="keep keys, queries and truth here")
    parser.add_argument("--index-cache", type=Path, help="keep built indexes here")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def make_data(args: argparse.Namespace) -> dict[str, Any]:
    """Keys ``(N, D)`` float16, named query sets ``(M, D)`` and their exact top-30 ids."""
    if args.source == "synthetic":
        keys = clustered_unit_vectors(args.keys, args.dim, n_clusters=200, seed=0).half()
        queries = {
            "spread": clustered_unit_vectors(1024, args.dim, n_clusters=200, seed=1),
            "image": clustered_queries(1024, args.dim, n_clusters=200, blobs=8),
        }
        for seed in args.image_seeds:
            queries[f"image{seed}"] = clustered_queries(
                1024, args.dim, n_clusters=200, blobs=8, seed=seed
            )
    else:
        curve_args = argparse.Namespace(**vars(args), queries=1568)
        keys, q = patch_keys(curve_args)
        queries = {"two": q[:1024], "one": q[:784]}
    exact = ExactIndex(args.dim).fill(keys)
    truth = {name: exact.search(q, 30)[1] for name, q in queries.items()}
    return {"keys": keys, "queries": queries, "truth": truth}


def cached_data(args: argparse.Namespace) -> dict[str, Any]:
    if args.data_cache is None:
        return make_data(args)
    noise = f"-images{args.images}-noise{args.noise}" if args.source == "patches" else ""
    seeds = "".join(f"-s{seed}" for seed in args.image_seeds) if args.source == "synthetic" else ""
    path = args.data_cache / f"{args.source}-{args.keys}x{args.dim}{noise}{seeds}.pt"
    if path.is_file():
        return torch.load(path)
    data = make_data(args)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, path)
    return data


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"ivfmm:nlist=1000"`` → ``("ivfmm", {"nlist": 1000})`` (values as JSON, else text)."""
    kind, *pairs = spec.split(":")
    params = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            params[name] = json.loads(value)
        except json.JSONDecodeError:
            params[name] = value
    return kind, params


def built_index(spec: str, args: argparse.Namespace, keys: torch.Tensor) -> tuple[Any, dict]:
    """The index of ``spec`` over ``keys``: read from ``--index-cache`` or built (and kept)."""
    kind, params = parse_spec(spec)
    folder = None
    if args.index_cache is not None:
        name = f"{args.source}-{args.keys}x{args.dim}-{spec.replace(':', '-').replace('=', '')}"
        folder = args.index_cache / name
        if (folder / "build.json").is_file():
            info = json.loads((folder / "build.json").read_text())
            return load_index(folder / "index"), info
    set_threads(args.build_threads or args.threads)
    start = time.perf_counter()
    index = create_index(kind, args.dim, expected_size=keys.shape[0], **params).fill(keys)
    index.search(keys[:8].float(), 30)  # lazy set-up (sorting in, residuals) counts as build
    info = {"build_s": time.perf_counter() - start, "build_threads": torch.get_num_threads()}
    set_threads(args.threads)
    if folder is not None:
        index.save(folder / "index")
        size = sum(p.stat().st_size for p in (folder / "index").rglob("*") if p.is_file())
        info["payload_bytes"] = size
        (folder / "build.json").write_text(json.dumps(info))
    return index, info


def grid_points(settings_grid: dict[str, list]) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = [{}]
    for name, values in settings_grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def run(args: argparse.Namespace) -> dict[str, Any]:
    data = cached_data(args)
    keys = data["keys"]
    indexes = {spec: built_index(spec, args, keys) for spec in args.grid}
    query_sets = args.query_sets or list(data["queries"])
    points = [
        {"index": spec, "queries": qname, **setting}
        for qname in query_sets
        for spec in args.grid
        for setting in grid_points(args.grid[spec])
    ]
    for p in points:
        p["wall_ms"], p["cpu_ms"] = [], []
    for _ in range(args.rounds + 1):  # round 0 warms up (kernels, caches); not counted
        for p in points:
            index = indexes[p["index"]][0]
            for name in ("nprobe", "k_factor"):
                if name in p:
                    setattr(index, name, p[name])
            q = data["queries"][p["queries"]]
            t, c = time.perf_counter(), time.process_time()
            ids = index.search(q, 30)[1]
            p["wall_ms"].append(1e3 * (time.perf_counter() - t))
            p["cpu_ms"].append(1e3 * (time.process_time() - c))
            p["recall"] = recall_at_k(ids, data["truth"][p["queries"]])
    for p in points:
        wall, cpu = p.pop("wall_ms")[1:], p.pop("cpu_ms")[1:]
        p.update(
            wall_min=min(wall), wall_median=median(wall), cpu_min=min(cpu), cpu_median=median(cpu)
        )
    builds = {spec: info for spec, (_, info) in indexes.items()}
    return {"points": points, "builds": builds, "load_at_end": os.getloadavg()}


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['keys']:,} × {s['dim']} float16 keys ({s['source']}), k = 30, {s['threads']} "
        f"search thread(s), {s['rounds']} interleaved rounds; load average "
        f"{report['environment']['load_average_at_start'][0]:.1f} at start, "
        f"{report['results']['load_at_end'][0]:.1f} at end.",
        "",
        "| queries | index | setting | recall@30 | wall ms min / median | CPU ms min / median |",
        "|---|---|---|---|---|---|",
    ]
    for p in report["results"]["points"]:
        setting = ", ".join(f"{k} {p[k]}" for k in ("nprobe", "k_factor") if k in p)
        lines.append(
            f"| {p['queries']} | `{p['index']}` | {setting} | {p['recall']:.3f} | "
            f"{p['wall_min']:.0f} / {p['wall_median']:.0f} | "
            f"{p['cpu_min']:.0f} / {p['cpu_median']:.0f} |"
        )
    lines += image_summary(report["results"]["points"])
    lines += ["", "| index | build s | payload MB |", "|---|---|---|"]
    for spec, info in report["results"]["builds"].items():
        size = info.get("payload_bytes")
        lines.append(
            f"| `{spec}` | {info['build_s']:.0f} | {'' if size is None else f'{size / 1e6:.0f}'} |"
        )
    return "\n".join(lines) + "\n"


def image_summary(points: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: recall@30 over the image-like query sets (``image``, ``image<seed>``)
    per index and setting, mean / sd / min / max, where there are at least two."""
    groups: dict[tuple, list[float]] = {}
    for p in points:
        if p["queries"].startswith("image"):
            setting = tuple((k, p[k]) for k in ("nprobe", "k_factor") if k in p)
            groups.setdefault((p["index"], setting), []).append(p["recall"])
    lines = []
    for (spec, setting), recalls in groups.items():
        if len(recalls) > 1:
            named = ", ".join(f"{k} {v}" for k, v in setting)
            lines.append(
                f"- `{spec}` {named}: recall@30 over {len(recalls)} image query sets mean "
                f"{mean(recalls):.3f}, sd {stdev(recalls):.3f}, min {min(recalls):.3f}, "
                f"max {max(recalls):.3f}"
            )
    return ["", *lines] if lines else []


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    report = {"settings": settings(args), "environment": environment(), "results": run(args)}
    write_report(report, args.out)
    args.out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
