"""Benchmark one query image through the predictor: encoder time against search + decode
time, for memory banks of 10k, 100k and 1M entries.

The encoder is a real architecture with random weights (default ViT-B/16 at 512 px, the
paper's evaluation setting: 1024 patches of 768-d features). The bank holds synthetic
clustered keys of the encoder's feature width, stored float16 as banks are, with one-hot
values over ``--classes`` classes; each query image's patches are drawn from the same
distribution (``hbird.index.synthetic``): from all of its blobs (``--queries spread``,
the default), or from 8 of them (``--queries image``), as one real image's patches come
from few parts of a bank, so they probe few inverted lists. For every bank size and index kind, the
predictor's own code path is timed per query image (best of ``--repeats``):

- ``encode``: ``encode_batches`` on one image (independent of the bank);
- ``search``: the index's top-k for every patch (``InContextPredictor.attend``);
- ``decode``: exact cosines from the stored keys, eq. 1, aggregation of the neighbours'
  values and upsampling to the image (``attend`` + ``aggregate`` + ``decode_dense``);
- ``recall@k`` of the index against the exact top-k;
- the build time of the index (``fill``) and the process RSS.

``--bank-dir DIR`` keeps each bank there and, as saved banks do, its built index in the
bank folder's index cache: a later run (on a quiet machine, say) then times search and
decode over the same index without the minutes of building it, and says so
(``index_from_cache``; ``build_s`` is then the time to load it).

Target (core issue): search + decode <= 10% of the encoder's time at 1M entries, with
recall@30 >= 0.9. The JSON reports that ratio per row.

    python benchmarks/predict.py --threads 1                       # ~15 min on 2 cores
    python benchmarks/predict.py --encoder vit_small_patch16_224 --image-size 224 --sizes 10000

Writes JSON to ``benchmarks/results/predict.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import environment, peak_rss_bytes, rss_bytes, set_threads, settings, write_report

from hbird import InContextPredictor, LabelSpec
from hbird.data.transforms import resize_for_encoder
from hbird.decode import aggregate, decode_dense, softmax_over_neighbours, upsample
from hbird.encoders import create_encoder, encode_batches
from hbird.index import choose_kind, create_index, recall_at_k
from hbird.index.base import META_FILE
from hbird.index.synthetic import clustered_queries, clustered_unit_vectors
from hbird.io.options import parse_pairs
from hbird.memory.bank import MemoryBank
from hbird.predictor import INDEX_CACHE

DEFAULT_OUT = Path(__file__).parent / "results" / "predict.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--encoder", default="vit_base_patch16_224", help="random weights")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument(
        "--indexes", nargs="+", default=["auto", "ivfpq"], help="index kinds per bank size"
    )
    parser.add_argument("--images", type=int, default=2, help="query images per measurement")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--clusters", type=int, default=200)
    parser.add_argument("--spread", type=float, default=0.75)
    parser.add_argument(
        "--queries",
        choices=["spread", "image"],
        default="spread",
        help="each query image's patches: drawn from all the keys' blobs (spread), or from "
        "8 of them, as one real image's patches come from few parts of the bank (image)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="timing passes; the best counts")
    parser.add_argument("--threads", type=int, default=None, help="torch and faiss threads")
    parser.add_argument(
        "--index-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an index parameter for every index measured (repeatable): nprobe=4, recall=0.9",
    )
    parser.add_argument(
        "--bank-dir",
        type=Path,
        default=None,
        help="keep each synthetic bank here and its built index beside it (the predictor's "
        "index cache), so a rerun times search and decode without rebuilding",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def best_seconds(run: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def synthetic_bank(args: argparse.Namespace, n: int, dim: int, encoder: Any) -> MemoryBank:
    """``n`` clustered float16 keys with one-hot values of ``args.classes`` classes."""
    spec = LabelSpec(task="segmentation", num_classes=args.classes)
    bank = MemoryBank(dim, spec, encoder.identity())
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n, 250_000):  # in pieces: float32 keys of 1M × 768 are 3 GB
        m = min(250_000, n - start)
        keys = clustered_unit_vectors(m, dim, args.clusters, args.spread, seed=start + 7)
        labels = torch.randint(0, args.classes, (m,), generator=gen)
        bank.append(keys, torch.nn.functional.one_hot(labels, args.classes).float())
    return bank


def saved_bank(args: argparse.Namespace, n: int, dim: int, encoder: Any) -> tuple[MemoryBank, Path]:
    """``synthetic_bank`` saved under ``--bank-dir`` (built once: the settings name the folder)."""
    name = f"{n}x{dim}-c{args.classes}-k{args.clusters}-s{args.spread}"
    path = args.bank_dir / name
    if not (path / "manifest.json").is_file():
        synthetic_bank(args, n, dim, encoder).save(path)
    return MemoryBank.load(path, encoder=encoder.identity()), path


def measure(
    args: argparse.Namespace,
    predictor: InContextPredictor,
    queries: list[torch.Tensor],
    exact_ids: list[torch.Tensor],
    size: tuple[int, int],
) -> dict[str, Any]:
    """Per query image seconds of search and decode, and recall against ``exact_ids``."""
    grid = args.image_size // predictor.encoder_.patch_size

    def one_pass() -> list[torch.Tensor]:
        predictor.timings.reset()
        ids = []
        for q in queries:
            weights, values = predictor.attend(q)
            with predictor.timings.measure("decode"):
                soft = aggregate(weights, values).reshape(grid, grid, -1)
                top = weights.max(dim=-1).values.reshape(grid, grid)
                decode_dense(soft, size, True, top)
            ids.append(predictor.index_.search(q, args.k)[1])
        return ids

    best: dict[str, float] = {}
    for _ in range(args.repeats):
        ids = one_pass()
        for stage in ("search", "decode"):
            seconds = predictor.timings.seconds[stage] / len(queries)
            best[stage] = min(best.get(stage, float("inf")), seconds)
    recall = sum(recall_at_k(a, b) for a, b in zip(ids, exact_ids)) / len(ids)
    return {
        "search_s": round(best["search"], 5),
        "decode_s": round(best["decode"], 5),
        **decode_breakdown(args, predictor, queries[0], size),
        f"recall@{args.k}": round(recall, 4),
    }


def decode_breakdown(
    args: argparse.Namespace, predictor: InContextPredictor, q: torch.Tensor, size: tuple[int, int]
) -> dict[str, float]:
    """Seconds of each decode step for one query image ``q (P, D)``, best of
    ``--repeats``: eq.-1 weights from the scores, the gather of the neighbours' values,
    their weighted sum, and upsampling + argmax to the image (``decode_dense``, tiled; and
    the ``(C, H, W)`` map then ``max``, as decode did before, for comparison)."""
    grid = args.image_size // predictor.encoder_.patch_size
    sims, ids = predictor.index_.search(q, args.k)
    safe = ids.clamp_min(0)
    q_norms = torch.linalg.vector_norm(q.float(), dim=-1)
    key_norms = predictor._key_norms()

    def weights() -> torch.Tensor:
        cosines = sims / (q_norms[:, None] * key_norms[safe]).clamp_min(1e-12)
        return softmax_over_neighbours(cosines, args.temperature, ids >= 0)

    w, values = weights(), predictor.bank_.values[safe]
    soft = aggregate(w, values).reshape(grid, grid, -1)
    return {
        "weights_s": round(best_seconds(weights, args.repeats), 5),
        "gather_values_s": round(
            best_seconds(lambda: predictor.bank_.values[safe], args.repeats), 5
        ),
        "aggregate_s": round(best_seconds(lambda: aggregate(w, values), args.repeats), 5),
        "upsample_s": round(best_seconds(lambda: decode_dense(soft, size, True), args.repeats), 5),
        "upsample_map_then_max_s": round(
            best_seconds(lambda: upsample(soft, size).max(dim=0), args.repeats), 5
        ),
    }


def bench_size(args: argparse.Namespace, n: int, encoder: Any, encode_s: float) -> dict[str, Any]:
    dim = encoder.feature_dim(None)
    patches = (args.image_size // encoder.patch_size) ** 2
    if args.bank_dir is None:
        bank, bank_path = synthetic_bank(args, n, dim, encoder), None
    else:
        bank, bank_path = saved_bank(args, n, dim, encoder)
    draw = clustered_queries if args.queries == "image" else clustered_unit_vectors
    queries = [
        draw(patches, dim, args.clusters, spread=args.spread, seed=10_000_000 + i)
        for i in range(args.images)
    ]
    exact = create_index("exact", dim).fill(bank.keys)
    exact_ids = [exact.search(q, args.k)[1] for q in queries]
    del exact
    rows: dict[str, Any] = {}
    for kind in args.indexes:
        resolved = choose_kind(n) if kind == "auto" else kind
        name = f"auto ({resolved})" if kind == "auto" else kind
        if name in rows or resolved in rows or f"auto ({kind})" in rows:
            continue
        gc.collect()
        rss_before = rss_bytes()
        start = time.perf_counter()
        cached = bank_path is not None and any((bank_path / INDEX_CACHE).glob(f"*/{META_FILE}"))
        search = {"k": args.k, "temperature": args.temperature, "index": kind, "progress": False}
        search["index_params"] = parse_pairs(args.index_param, "--index-param", "nprobe=4")
        if bank_path is None:
            predictor = InContextPredictor.from_bank(bank, encoder, **search)
        else:  # the index comes from the bank folder's cache if an earlier run built it
            predictor = InContextPredictor.load(bank_path, encoder, **search)
        build_s = time.perf_counter() - start
        numbers = measure(args, predictor, queries, exact_ids, (args.image_size,) * 2)
        ratio = (numbers["search_s"] + numbers["decode_s"]) / encode_s
        rows[name] = {
            "index": predictor.index_.describe(),
            "build_s": round(build_s, 2),
            "index_from_cache": cached,  # build_s is then the load of one built earlier
            "index_rss_bytes": rss_bytes() - rss_before,
            **numbers,
            "search_plus_decode_over_encode": round(ratio, 3),
        }
        print(
            f"  N={n:>9,} {name:14s} build {build_s:7.1f} s | search {numbers['search_s']:.3f} s "
            f"+ decode {numbers['decode_s']:.3f} s per image = {ratio:.1%} of encode "
            f"(decode: weights {numbers['weights_s']:.3f}, values {numbers['gather_values_s']:.3f}, "
            f"sum {numbers['aggregate_s']:.3f}, upsample {numbers['upsample_s']:.3f} s, "
            f"as a map then max {numbers['upsample_map_then_max_s']:.3f} s) "
            f"| recall@{args.k} {numbers[f'recall@{args.k}']}",
            flush=True,
        )
        del predictor
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    encoder = create_encoder(args.encoder).eval()
    image = torch.rand(
        3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(0)
    )
    view = resize_for_encoder(image, args.image_size, encoder.patch_size)
    encode_batches(encoder, [view])  # warm-up
    encode_s = best_seconds(lambda: encode_batches(encoder, [view]), args.repeats)
    patches = (args.image_size // encoder.patch_size) ** 2
    print(
        f"{args.encoder} (random weights) at {args.image_size} px: {patches} patches of "
        f"{encoder.feature_dim(None)}-d, encode {encode_s:.3f} s per image",
        flush=True,
    )
    report: dict[str, Any] = {
        "config": settings(args),
        "environment": environment(),
        "encoder": {
            "name": args.encoder,
            "patches_per_image": patches,
            "feature_dim": encoder.feature_dim(None),
            "encode_s_per_image": round(encode_s, 4),
        },
        "sizes": {},
    }
    for n in args.sizes:
        report["sizes"][str(n)] = bench_size(args, n, encoder, encode_s)
        gc.collect()
    report["environment"]["load_average_at_end"] = os.getloadavg()
    report["peak_rss_bytes"] = peak_rss_bytes()
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
