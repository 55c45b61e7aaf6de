"""Hummingbird pretraining of the tiny backbones on CPU: held-out retrieval mIoU before
and after, for the ViT (``test_vit``) and the feature-map backbones (``test_elastic``,
``test_axial``), and the scale-policy picture of the trained ``test_elastic``.

    python benchmarks/pretrain_backbones.py                       # all three, 200 steps
    python benchmarks/pretrain_backbones.py --archs test_elastic --steps 100

The data and probe are those ``tests/test_pretrain_synthetic.py`` uses for the tiny ViT
(seeded synthetic scenes of 8 classes with ±40% colour jitter, 64-pixel crops, the
Hummingbird objective with its tiny heads; eq.-1 retrieval with k = 30, β = 0.02 on 32
prompt and 32 query scenes of other seeds); the run is shorter (200 steps of batch 32 at
lr 1e-3, the setting of the slow test in ``tests/test_pretrain_backbones.py``) because the
feature-map backbones are slow on CPU. Each backbone keeps its own patch grid at the
probe size (ViT: 8-pixel patches; ELASTIC and Axial-ResNet: output stride 16), so
``--eval-size 128`` gives the stride-16 models the ViT's 8 × 8 grid at 64.

Writes JSON to ``benchmarks/results/pretrain_backbones.json`` and the picture to
``docs/images/elastic_scale_policy.png`` unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, write_report

from hbird.pretrain import PretrainConfig, Trainer
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.evaluation import RetrievalProbe, synthetic_set
from hbird.pretrain.presets import tiny_options

ROOT = Path(__file__).parent
SCENES = {"classes": 8, "colour_jitter": 0.4}


def pretrain(arch: str, args: argparse.Namespace, probe: RetrievalProbe) -> dict[str, Any]:
    images = SyntheticImages(n=50_000, seed=0, size=64, **SCENES)
    with tempfile.TemporaryDirectory() as out:
        config = PretrainConfig(
            objective="hummingbird",
            objective_options=tiny_options("hummingbird"),
            arch=arch,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            crop_size=64,
            num_workers=1,
            log_every=args.eval_every,
            eval_every=args.eval_every,
            out=out,
        )
        start = time.perf_counter()
        trainer = Trainer(config, images=images, probe=probe, log=print)
        trainer.fit()
        seconds = time.perf_counter() - start
        records = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    curve = [{"step": r["step"], "miou": r["eval/miou"]} for r in records if "eval/miou" in r]
    if arch == "test_elastic" and args.picture:
        write_scale_policy(trainer.objective.export_backbone(), args.picture)
    return {
        "arch": arch,
        "params": sum(p.numel() for p in trainer.objective.backbone.model.parameters()),
        "patch_grid_at_eval": args.eval_size // trainer.objective.backbone.patch_size,
        "miou_init": curve[0]["miou"],
        "miou_final": curve[-1]["miou"],
        "gain": curve[-1]["miou"] - curve[0]["miou"],
        "curve": curve,
        "seconds": seconds,
    }


def write_scale_policy(backbone, path: Path) -> None:
    """Scores of the trained model on 64 held-out 128-pixel scenes, one row per image."""
    from hbird.nn.elastic import scale_policy_scores
    from hbird.viz.scale_policy import plot_scale_policy

    model = backbone.frozen_encoder().model
    scenes = synthetic_set(64, 300, 128, **SCENES)
    images = backbone.normalize(torch.stack(scenes.images))
    scores = scale_policy_scores(model, images)
    stages = [i + 1 for i, s in enumerate(model.stage_modules()) for b in s if b.elastic]
    title = "test_elastic after Hummingbird pretraining: scale policy on 64 scenes"
    plot_scale_policy(path, scores, stage_of_block=stages, title=title)
    print(f"scale-policy picture written to {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=["test_vit", "test_elastic", "test_axial"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--eval-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "pretrain_backbones.json")
    parser.add_argument(
        "--picture", type=Path, default=ROOT.parent / "docs" / "images" / "elastic_scale_policy.png"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    probe = RetrievalProbe(
        synthetic_set(32, 100, 64, **SCENES),
        synthetic_set(32, 200, 64, **SCENES),
        image_size=args.eval_size,
        k=30,
        temperature=0.02,
    )
    runs = [pretrain(arch, args, probe) for arch in args.archs]
    for r in runs:
        print(f"{r['arch']}: mIoU {r['miou_init']:.4f} → {r['miou_final']:.4f} "
              f"({r['gain']:+.4f}) in {r['seconds']:.0f} s")  # fmt: skip
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_report({"environment": environment(), "settings": settings, "runs": runs}, args.out)


if __name__ == "__main__":
    main()
