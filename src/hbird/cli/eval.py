"""``hbird eval``: the retrieval protocol (and its comparisons) on a benchmark or a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hbird.cli.common import AUTOCAST_HELP, parse_index_params, parse_layers
from hbird.eval.config import parse_overrides, preset_names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="spec: voc:root=DIR, ade20k:root=DIR, nyuv2:root=DIR, folder:root=DIR...",
    )
    parser.add_argument("--encoder", help="encoder name (default vit_small_patch16_224.dino)")
    parser.add_argument("--weights", help="local checkpoint for the encoder")
    parser.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="use published weights",
    )
    parser.add_argument(
        "--preset", help=f"settings preset: {', '.join(preset_names())}, or a YAML file"
    )
    parser.add_argument(
        "--out", type=Path, help="run folder (resumable); without it nothing is written"
    )
    parser.add_argument(
        "--protocol", choices=["retrieval", "linear", "fast-adaptation"], default="retrieval",
        help="retrieval (default), linear probe baseline, or fast-adaptation curves",
    )  # fmt: skip
    parser.add_argument(
        "--fractions", help="data-efficiency sweep, e.g. 1/128,1/64,1/32 (retrieval protocol)"
    )
    parser.add_argument(
        "--seeds", default="42,400,783", help="seeds of the few-shot subsets (default 42,400,783)"
    )
    parser.add_argument(
        "--features", choices=["patch", "fungi"], help="patch features (default) or dense FUNGI"
    )
    parser.add_argument("--layers", help="block index or comma-separated indices")
    for flag, kind in (("--image-size", int), ("--k", int), ("--temperature", float), ("--memory-size", int),
                       ("--aug-epochs", int), ("--batch-size", int), ("--seed", int), ("--max-queries", int)):  # fmt: skip
        parser.add_argument(flag, type=kind)
    parser.add_argument("--index", choices=["auto", "exact", "flat", "ivfpq", "hnsw", "scann"])
    parser.add_argument("--device", help="torch device")
    parser.add_argument("--autocast", choices=["bf16", "fp16"], help=AUTOCAST_HELP)
    parser.add_argument(
        "--index-param", action="append", default=[], metavar="KEY=VALUE",
        help="index backend option, repeatable (e.g. k_factor=16 for ivfpq)",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=10, help="linear probe: training epochs")
    parser.add_argument("--lr", type=float, default=0.01, help="linear probe: SGD learning rate")
    parser.add_argument(
        "--patch-batch-size", type=int, default=1024, help="linear probe: patches per SGD step"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="any setting, e.g. memory_size=null k=50"
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags (only those given); ``KEY=VALUE`` overrides are applied after them."""
    names = ("weights", "pretrained", "image_size", "k", "temperature", "memory_size", "aug_epochs",
             "batch_size", "seed", "max_queries", "index", "device", "features", "autocast")  # fmt: skip
    config = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.layers is not None:
        config["layers"] = parse_layers(args.layers)
    if args.index_param:
        config["index_params"] = parse_index_params(args.index_param)
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    common = dict(out=args.out, preset=args.preset, overrides=parse_overrides(args.overrides),
                  progress=not args.quiet, **config)  # fmt: skip
    encoder = args.encoder
    if args.protocol == "linear":
        from hbird.eval.linear_probe import linear_probe

        report = linear_probe(
            encoder, args.dataset, epochs=args.epochs, lr=args.lr,
            patch_batch_size=args.patch_batch_size, **common,
        )  # fmt: skip
        print(report.summary())
        return 0
    if args.protocol == "fast-adaptation":
        from hbird.eval.fast_adaptation import fast_adaptation

        fractions = args.fractions.split(",") if args.fractions else ("1/64", "1/16", "1/4", "1/1")
        result = fast_adaptation(
            encoder, args.dataset, fractions=fractions, lr=args.lr,
            patch_batch_size=args.patch_batch_size, **common,
        )  # fmt: skip
        print(result.summary())
        return 0
    if args.fractions:
        from hbird.eval.fractions import evaluate_fractions

        seeds = [int(s) for s in args.seeds.split(",")]
        result = evaluate_fractions(
            encoder, args.dataset, fractions=args.fractions.split(","), seeds=seeds, **common
        )
        print(result.summary())
        return 0
    from hbird.eval import evaluate

    report = evaluate(encoder, args.dataset, **common)
    print(report.summary())
    if args.out is not None:
        print(f"run folder: {args.out}")
    return 0
