"""``hbird bank build|info``: build a memory bank from a prompt folder (resumable), or show one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hbird.cli.common import (
    add_predictor_arguments,
    given_settings,
    predictor_from_args,
    prompt_dataset,
)
from hbird.errors import InputError
from hbird.eval.report import layers_text
from hbird.io.files import check_output
from hbird.labelspec import LabelSpec
from hbird.specs import SearchConfig, split_stored_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bank_command", metavar="{build,info}", required=True)
    build = sub.add_parser(
        "build", help="encode a prompt folder into a bank folder (resumes if interrupted)"
    )
    build.add_argument(
        "--prompt", type=Path, required=True, help="prompt folder: images/ + masks/ or depth/"
    )
    build.add_argument("--out", type=Path, required=True, help="bank folder to create")
    build.add_argument("--shard-size", type=int, default=1_000_000, help="entries per shard file")
    build.add_argument("--overwrite", action="store_true", help="replace an existing bank folder")
    build.add_argument("--quiet", action="store_true", help="no progress bars")
    add_predictor_arguments(build)
    info = sub.add_parser("info", help="print a bank's manifest summary")
    info.add_argument("bank", type=Path, help="the bank folder")
    info.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    info.add_argument(
        "--shards",
        type=int,
        metavar="W",
        help="also show how the bank splits over W ranks with --shard-bank (torchrun)",
    )


def format_sharding(path: Path, manifest: dict, world: int) -> str:
    """How ``--shard-bank`` splits the bank over ``world`` ranks: rows, MiB, shard files."""
    from hbird.index.sharded import slice_bounds
    from hbird.memory.values import SLOTS

    if world < 1:
        raise InputError(f"--shards must be >= 1, got {world}")
    total = manifest["counts"]["entries"]
    row_bytes = manifest["feature_dim"] * (2 if manifest["key_dtype"] == "float16" else 4)
    value_dim = LabelSpec.from_dict(manifest["label_spec"]).value_dim
    sparse = manifest.get("value_storage") == "sparse"  # its slots; mixed rows add theirs
    row_bytes += 6 * min(SLOTS, value_dim) if sparse else 4 * value_dim
    bounds, stop = [], 0
    for shard in manifest["shards"]:
        bounds.append((stop, stop + shard["entries"], shard["file"]))
        stop += shard["entries"]
    lines = [f"sharding    over {world} rank(s) (--shard-bank): entries, keys + values in memory"]
    for rank in range(world):
        lo, hi = slice_bounds(total, rank, world)
        files = [f for a, b, f in bounds if a < hi and b > lo]
        lines.append(
            f"  rank {rank:<3} rows {lo:,}..{hi:,} ({hi - lo:,} entries, "
            f"{(hi - lo) * row_bytes / 2**20:.1f} MiB) from {len(files)} shard file(s)"
        )
    return "\n".join(lines)


def format_info(path: Path, manifest: dict) -> str:
    from hbird.predictor import INDEX_CACHE

    spec = manifest["label_spec"]
    enc = manifest["encoder"]
    cfg, search = split_stored_config(
        manifest.get("config", {}), manifest.get("search"), str(path / "manifest.json")
    )
    size = sum(
        (path / s["file"]).stat().st_size for s in manifest["shards"] if (path / s["file"]).exists()
    )
    lines = [
        f"bank        {path}",
        f"entries     {manifest['counts']['entries']:,} from {manifest['counts']['images']:,} prompt images",
        f"keys        {manifest['feature_dim']}-d {manifest['key_dtype']}, {len(manifest['shards'])} shard(s), {size / 2**20:.1f} MiB",
        f"values      {manifest.get('value_storage', 'dense')}",
        f"encoder     {enc['name']} (config {enc['config_hash']}, weights {enc['weights_hash']})",
        f"task        {spec['task']}"
        + (
            f", {spec['num_classes']} classes, ignore {spec['ignore_index']}"
            if spec["task"] == "segmentation"
            else ""
        ),
        f"prompt      image size {cfg.image_size}, layers {layers_text(cfg.layers)}, "
        f"aug epochs {cfg.aug_epochs}, sampling {cfg.sampling}, memory size {cfg.memory_size or 'all'}",
        f"input       normalize {cfg.normalize}, resize {cfg.resize}, label pooling "
        f"{cfg.label_pooling}, first pass {'augmented' if cfg.augment_first_epoch else 'plain'}",
        f"features    {cfg.features}" + (f" {cfg.feature_options}" if cfg.feature_options else ""),
        f"retrieval   k {search.get('k')}, temperature {search.get('temperature')}, index {search.get('index')}",
        f"created     {manifest.get('created', 'unknown')}",
    ]
    cached = sorted(p.name for p in (path / INDEX_CACHE).glob("*") if p.is_dir())
    if cached:
        lines.append(f"indexes     {', '.join(cached)} (built, reused on load)")
    return "\n".join(lines)


SETTING_FLAGS = {"root": "--prompt"}


def interrupted(args: argparse.Namespace) -> str:
    from hbird.memory.bank import is_bank

    if getattr(args, "bank_command", None) != "build":
        return "nothing was written"
    if is_bank(args.out):
        return (
            f"the bank {args.out} is complete, its search index is not; the first "
            f"'hbird predict --bank {args.out}' builds and keeps it"
        )
    partial = args.out.with_name(args.out.name + ".partial")
    if not partial.is_dir():
        return "nothing was kept (no shard was finished); run the same command again"
    return f"the images encoded so far are kept in {partial}; run the same command to resume"


def run(args: argparse.Namespace) -> int:
    from hbird.data.pairs import DatasetPairs
    from hbird.memory.bank import MemoryBank, check_bank_path
    from hbird.predictor import InContextPredictor

    if args.bank_command == "info":
        manifest = MemoryBank.read_manifest(args.bank)
        print(json.dumps(manifest, indent=2) if args.json else format_info(args.bank, manifest))
        if args.shards is not None:
            print(format_sharding(args.bank, manifest, args.shards))
        return 0
    check_bank_path(args.out, args.overwrite)  # before any work, and before anything is deleted
    check_output(args.out, "--out")
    dataset = prompt_dataset(args, args.prompt)
    predictor = predictor_from_args(args)
    path = predictor.build_bank(
        DatasetPairs(dataset),
        dataset.label_spec,
        args.out,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
    )
    from hbird.distributed import is_main

    if not is_main():  # rank 0 indexes the bank and reports
        return 0
    # build the search index now and keep it with the bank, so the first predict is fast
    search = given_settings(args, SearchConfig)
    InContextPredictor.load(path, encoder=predictor.encoder_, progress=not args.quiet, **search)
    print(format_info(path, MemoryBank.read_manifest(path)))
    return 0
