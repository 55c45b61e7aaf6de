"""``hbird eval``: the retrieval protocol (and its comparisons) on a benchmark or a folder."""

from __future__ import annotations

import argparse
import builtins
import functools
from pathlib import Path
from typing import Any

from hbird.cli.common import add_max_pixels_argument, add_spec_arguments, given_settings, int_list
from hbird.eval.config import (
    DEFAULT_PRESET,
    PROTOCOL_FIELDS,
    EvalConfig,
    load_preset,
    parse_overrides,
    preset_names,
)
from hbird.io.files import check_output
from hbird.specs import BankSpec, SearchConfig

SETTING_FLAGS = {"root": "root=", "split": "split="}  # keys of the --dataset spec
OVERRIDES = "overrides"  # KEY=VALUE items may stand anywhere on the line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        required=True,
        help="spec: voc:root=DIR, ade20k:root=DIR, nyuv2:root=DIR, folder:root=DIR...",
    )
    parser.add_argument(
        "--preset", help=f"settings preset: {', '.join(preset_names())}, or a YAML file"
    )
    parser.add_argument(
        "--out", type=Path, help="run folder (resumable); without it nothing is written"
    )
    parser.add_argument(
        "--protocol",
        choices=[
            "retrieval",
            "linear",
            "fast-adaptation",
            "reco",
            "panoptic-retrieval",
            "panoptic-deeplab",
            "max-deeplab",
        ],
        default="retrieval",
        help="retrieval (default), linear probe baseline, fast-adaptation curves, reco "
        "(zero-shot, with --refs), panoptic retrieval (PQ on a panoptic dataset), or a "
        "finetuned panoptic specialist (panoptic-deeplab = Axial-DeepLab, max-deeplab)",
    )
    parser.add_argument(
        "--refs", type=Path, help="reco protocol: saved ReCo references (hbird zeroshot build)"
    )
    parser.add_argument(
        "--grouping",
        choices=["offsets", "components"],
        default="offsets",
        help="panoptic-retrieval: thing instances from retrieved centre offsets (default) or "
        "connected components of the predicted thing classes",
    )
    parser.add_argument(
        "--train",
        action="append",
        metavar="KEY=VALUE",
        help="panoptic-deeplab/max-deeplab: a training setting (steps=2000, crop_size=512, "
        "batch_size=8, lr=0.001...); repeatable",
    )
    parser.add_argument(
        "--specialist-option",
        action="append",
        metavar="KEY=VALUE",
        help="panoptic-deeplab/max-deeplab: a model option (backbone=axial_deeplab_s...); "
        "repeatable",
    )
    parser.add_argument(
        "--specialist-checkpoint",
        help="panoptic-deeplab/max-deeplab: evaluate this specialist.safetensors, no training",
    )
    parser.add_argument(
        "--fractions",
        help="data-efficiency sweep, e.g. 1/128,1/64,1/32 (retrieval and panoptic-retrieval)",
    )
    parser.add_argument(
        "--seeds",
        type=int_list("--seeds"),
        default=[42, 400, 783],
        help="seeds of the few-shot subsets (default 42,400,783)",
    )
    preset = load_preset(DEFAULT_PRESET)
    add_spec_arguments(parser, BankSpec, "memory (how the bank is built)", preset=preset)
    add_spec_arguments(parser, SearchConfig, "search", preset=preset)
    add_spec_arguments(parser, EvalConfig, "evaluation", names=PROTOCOL_FIELDS, preset=preset)
    parser.add_argument(
        "--epochs",
        type=int,
        help="linear probe: training epochs (default 10; fast-adaptation: 1, 2, 5 and 10); "
        "panoptic-deeplab/max-deeplab: passes over the train split (instead of --train steps)",
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="linear probe: SGD learning rate (default 0.01); panoptic-deeplab/max-deeplab: "
        "the specialist's learning rate (default 0.001)",
    )
    parser.add_argument(
        "--patch-batch-size", type=int, default=1024, help="linear probe: patches per SGD step"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_max_pixels_argument(parser)
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="any setting, e.g. memory_size=null k=50 (anywhere on the line)",
    )


def config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Explicit flags (only those given); ``KEY=VALUE`` overrides are applied after them."""
    config = given_settings(args, EvalConfig)
    config.pop("encoder", None)  # passed on its own
    return config


def interrupted(args: argparse.Namespace) -> str:
    if args.out is None:
        return "nothing was kept (no --out); give --out DIR to make a run resumable"
    return f"the results finished so far are kept in {args.out}; run the same command to resume"


def _silent(*_: Any) -> None:
    """What ranks other than 0 print: nothing (they hold the same report)."""


def run(args: argparse.Namespace) -> int:
    from hbird.distributed import is_main

    print = builtins.print if is_main() else _silent  # noqa: A001 - rank 0 reports
    if args.out is not None:
        check_output(args.out, "--out")
    config = config_from_args(args)
    common = dict(
        out=args.out,
        preset=args.preset,
        overrides=parse_overrides(args.overrides),
        progress=not args.quiet and is_main(),
        **config,
    )
    encoder = getattr(args, "encoder", None)
    if args.protocol == "reco":
        from hbird.eval.reco import run_from_args

        return run_from_args(args, config)
    if args.protocol in ("panoptic-deeplab", "max-deeplab"):
        from hbird.eval.specialist import run_from_args

        return run_from_args(args, common, print)
    if args.protocol == "linear":
        from hbird.eval.linear_probe import linear_probe

        report = linear_probe(
            encoder,
            args.dataset,
            epochs=10 if args.epochs is None else args.epochs,
            **({} if args.lr is None else {"lr": args.lr}),
            patch_batch_size=args.patch_batch_size,
            **common,
        )
        print(report.summary())
        return 0
    if args.protocol == "fast-adaptation":
        from hbird.eval.fast_adaptation import DEFAULT_LINEAR_EPOCHS, fast_adaptation

        fractions = args.fractions.split(",") if args.fractions else ("1/64", "1/16", "1/4", "1/1")
        result = fast_adaptation(
            encoder,
            args.dataset,
            fractions=fractions,
            **({} if args.lr is None else {"lr": args.lr}),
            linear_epochs=DEFAULT_LINEAR_EPOCHS if args.epochs is None else [args.epochs],
            patch_batch_size=args.patch_batch_size,
            **common,
        )
        print(result.summary())
        return 0
    protocol: dict[str, Any] = {}
    if args.protocol == "panoptic-retrieval":
        from hbird.eval.panoptic import evaluate_panoptic

        protocol["protocol"] = functools.partial(evaluate_panoptic, grouping=args.grouping)
    if args.fractions:
        from hbird.eval.fractions import evaluate_fractions

        result = evaluate_fractions(
            encoder,
            args.dataset,
            fractions=args.fractions.split(","),
            seeds=args.seeds,
            **protocol,
            **common,
        )
        print(result.summary())
        return 0
    from hbird.eval import evaluate

    report = protocol.get("protocol", evaluate)(encoder, args.dataset, **common)
    print(report.summary())
    if args.out is not None:
        print(f"run folder: {args.out}")
    return 0
