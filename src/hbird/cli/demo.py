"""``hbird demo``: the whole loop offline on synthetic scenes with a tiny untrained encoder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, default=Path("hbird-demo"), help="output folder (default ./hbird-demo)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from hbird.demo import DemoConfig, follow_up_commands, run_demo
    from hbird.io.files import check_output

    check_output(args.out, "--out")

    print("hbird demo: synthetic scenes and a tiny UNTRAINED encoder (test_vit), all offline.")
    m = run_demo(args.out, DemoConfig(seed=args.seed), progress=not args.quiet)
    seg, shuf = m["segmentation"], m["segmentation_shuffled_labels"]
    dep, base = m["depth"], m["depth_prompt_mean_baseline"]
    print(f"segmentation mIoU {seg['miou']:.3f} (prompt labels shuffled: {shuf['miou']:.3f})")
    print(
        f"depth RMSE {dep['rmse']:.3f} m (predicting the prompt's mean depth: {base['rmse']:.3f} m)"
    )
    print(
        f"report: {args.out / 'report.md'}  pictures: {args.out / 'pictures'}  ({m['seconds']:.1f} s)"
    )
    print(
        "These numbers only show the machinery works; for real predictions use real weights,"
        " e.g. on this demo's data:"
    )
    for command in follow_up_commands(args.out):
        print(f"  {command}")
    return 0
