"""Panoptic specialists on CPU: training step and inference time, parameters, multiply-adds.

For every registered specialist (``hbird.panoptic.specialist.SPECIALISTS``: Axial-DeepLab
as ``panoptic-deeplab``, MaX-DeepLab as ``max-deeplab`` once registered), built with its
paper defaults on Cityscapes' label space (19 classes, things 11-18) unless
``--option NAME:key=value`` says otherwise, at each ``--sizes`` side (square inputs):

* ``train_step_s``: one optimizer step of the specialist trainer's optimiser (RAdam +
  Lookahead) on a batch of ``--batch`` synthetic panoptic scenes: forward, loss (its
  targets included), backward, step; the best of ``--repeats`` after one warm-up step;
* ``inference_s_per_image``: forward + ``predict`` (grouping) in eval mode, batch 1;
* ``params_m``, ``macs_b``: parameters and multiply-adds of one forward pass at batch 1
  (``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2; attention's matrix
  products are counted, softmax and normalisation are not).

    python benchmarks/panoptic.py --threads 1 --sizes 256 512
    python benchmarks/panoptic.py --option panoptic-deeplab:backbone=axial_deeplab_s

Each (specialist, size) runs in its own process.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import child_row, environment, set_threads, settings, write_report  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "panoptic.json"
CITYSCAPES = {"num_classes": 19, "thing_classes": tuple(range(11, 19))}


def specialist_names() -> list[str]:
    from hbird.panoptic.specialist import builtin_specialists

    return builtin_specialists().names()


def parse_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["panoptic-deeplab:backbone=axial_deeplab_s", ...]`` → options per specialist."""
    from hbird.io.options import parse_spec

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, fields = parse_spec(item, "--option", "panoptic-deeplab:backbone=axial_deeplab_s")
        out.setdefault(name, {}).update(fields)
    return out


def batch_of_scenes(side: int, batch: int):
    from hbird.data.panoptic_synthetic import make_panoptic_scene, scene_rng
    from hbird.panoptic.specialist import PanopticTarget

    scenes = [
        make_panoptic_scene(scene_rng(0, i), size=(side, side), object_size=(side / 4, side / 2.5))
        for i in range(batch)
    ]
    images = torch.stack([s.image for s in scenes])
    # the scenes' classes 0..3 mapped into the label space: ground → 0, things → 11, 12, 13
    targets = [
        PanopticTarget(torch.where(s.semantic > 0, s.semantic + 10, 0), s.instance) for s in scenes
    ]
    return images, targets


def measure_one(name: str, side: int, batch: int, repeats: int, options: dict[str, Any]):
    from torch.utils.flop_counter import FlopCounterMode

    from hbird.panoptic.specialist import create_specialist
    from hbird.panoptic.training import SpecialistConfig, build_optimizer

    torch.manual_seed(0)
    model = create_specialist(
        name, CITYSCAPES["num_classes"], CITYSCAPES["thing_classes"], **options
    )
    optimizer = build_optimizer(model, SpecialistConfig(specialist=name))
    images, targets = batch_of_scenes(side, batch)
    x = model.normalize(images)
    steps = []
    model.train()
    for _ in range(repeats + 1):  # the first step warms up
        start = time.perf_counter()
        losses = model.loss(model(x), targets)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        steps.append(time.perf_counter() - start)
    model.eval()
    inference = []
    with torch.no_grad():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            model.predict(model(x[:1]), (side, side))
            inference.append(time.perf_counter() - start)
        # FlopCounterMode's module tracker fails on parameters that require grad and
        # enter a module as inputs (MaX-DeepLab's memory): count with them frozen
        model.requires_grad_(False)
        with FlopCounterMode(display=False) as counter:
            model(x[:1])
    return {
        "specialist": name,
        "options": model.options(),
        "side": side,
        "batch": batch,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "macs_b": counter.get_total_flops() / 2 / 1e9,
        "train_step_s": min(steps[1:]),
        "inference_s_per_image": min(inference[1:]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specialists", nargs="+", help="default: every registered one")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, default=1, help="images per training step")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after a warm-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument(
        "--option", action="append", default=[], help="NAME:key=value builder option"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--one", nargs=2, metavar=("NAME", "SIDE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    options = parse_options(args.option)
    if args.one:  # the child process: one measurement, as JSON on stdout
        name, side = args.one[0], int(args.one[1])
        row = measure_one(name, side, args.batch, args.repeats, options.get(name, {}))
        print(json.dumps(row))
        return
    rows = []
    for name in args.specialists or specialist_names():
        for side in args.sizes:
            child = [sys.executable, __file__, "--one", name, str(side)]
            child += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
            child += ["--threads", str(args.threads), *(f"--option={o}" for o in args.option)]
            row = child_row(child)
            if "error" in row:
                raise SystemExit(f"{name} at {side}: {row['error']}")
            rows.append(row)
            print(
                f"{name:18s} {side:4d}  {row['params_m']:7.2f}M  {row['macs_b']:8.2f}B MACs  "
                f"train step {row['train_step_s']:7.2f} s  "
                f"inference {row['inference_s_per_image']:7.3f} s/image"
            )
    write_report({"environment": environment(), "settings": settings(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
