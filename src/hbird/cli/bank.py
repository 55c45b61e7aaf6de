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
from hbird.eval.report import layers_text
from hbird.io.files import check_output
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
    # build the search index now and keep it with the bank, so the first predict is fast
    search = given_settings(args, SearchConfig)
    InContextPredictor.load(path, encoder=predictor.encoder_, progress=not args.quiet, **search)
    print(format_info(path, MemoryBank.read_manifest(path)))
    return 0
