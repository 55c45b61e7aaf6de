"""The effect of each open-hummingbird-eval setting on the same inputs (docs/evaluation.md).

hbird's defaults are run once, then with each of the ``open-hbird`` preset's departures
switched on alone, then the two that compound (squashing and ignore-as-class-0 pooling),
then all of them (the preset itself). Everything else is shared:
``k``, β, one memory pass, every patch kept, exact search, the encoder and the data.
Each row reports mIoU against the ground truth (at the original size, ignore pixels
skipped) and the fraction of pixels whose predicted class equals the defaults'.

The data are seeded synthetic scenes (non-square, with ignored class boundaries as VOC
has), the encoder a random tiny ViT by default, so the numbers say how much each setting
moves predictions, not how a trained model scores on a benchmark.

    python benchmarks/open_hbird.py                                  # ~15 s on 2 cores
    python benchmarks/open_hbird.py --encoder vit_small_patch16_224 --image-size 112 --size 112x224

Writes JSON to ``benchmarks/results/open_hbird.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from _common import environment, set_threads, settings, write_report

from hbird import InContextPredictor
from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.eval.config import load_preset
from hbird.metrics import ConfusionMatrix

DEFAULT_OUT = Path(__file__).parent / "results" / "open_hbird.json"
TOGGLES = ("normalize", "resize", "label_pooling", "augment_first_epoch", "key_dtype")
"""The preset's settings that differ from hbird's defaults, one row each."""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="test_vit", help="encoder (random weights)")
    p.add_argument("--image-size", type=int, default=64, help="S: short side, or square side")
    p.add_argument("--size", default="64x128", help="scene size HxW (non-square)")
    p.add_argument("--prompt", type=int, default=24, help="prompt scenes per seed")
    p.add_argument("--queries", type=int, default=12, help="query scenes per seed")
    p.add_argument("--seeds", default="0,1,2", help="scene (and augmentation) seeds")
    p.add_argument("--ignore-boundary", type=int, default=3, help="ignored px at boundaries")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args()


def predictions(settings: dict[str, Any], prompt, queries) -> list[torch.Tensor]:
    p = InContextPredictor(**settings, progress=False)
    p.fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=4)
    return p.predict([s.image for s in queries])


def score(preds: list[torch.Tensor], reference: list[torch.Tensor], queries) -> dict[str, float]:
    cm = ConfusionMatrix(4, ignore_index=255)
    for pred, s in zip(preds, queries):
        cm.update(pred, s.mask)
    same = sum(int((p == r).sum()) for p, r in zip(preds, reference))
    return {"miou": cm.compute().miou, "agreement": same / sum(r.numel() for r in reference)}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    preset = load_preset("open-hbird")
    shared = {n: preset[n] for n in ("k", "temperature", "aug_epochs", "memory_size", "index")}
    torch.manual_seed(0)  # one set of random weights for every row (timm draws them globally)
    encoder = create_encoder(args.encoder)
    shared.update(encoder=encoder, image_size=args.image_size)
    rows = {"hbird defaults": {}, **{f"+ {n}": {n: preset[n]} for n in TOGGLES}}
    rows["+ resize + label_pooling"] = {n: preset[n] for n in ("resize", "label_pooling")}
    rows["open-hbird (all)"] = {n: preset[n] for n in TOGGLES}
    height, width = (int(x) for x in args.size.split("x"))
    results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
    for seed in (int(s) for s in args.seeds.split(",")):
        scenes = make_scenes(
            args.prompt + args.queries,
            seed=seed,
            num_classes=4,
            size=(height, width),
            ignore_boundary=args.ignore_boundary,
        )
        prompt, queries = scenes[: args.prompt], scenes[args.prompt :]
        reference = None
        for name, toggles in rows.items():
            preds = predictions({**shared, "seed": seed, **toggles}, prompt, queries)
            reference = preds if reference is None else reference
            results[name].append(score(preds, reference, queries))
            print(seed, name, results[name][-1], flush=True)
    table = {
        name: {key: sum(r[key] for r in runs) / len(runs) for key in ("miou", "agreement")}
        for name, runs in results.items()
    }
    write_report(
        {
            "environment": environment(),
            "settings": settings(args),
            "shared": {**shared, "encoder": args.encoder},
            "rows": {name: {"settings": rows[name], **table[name]} for name in rows},
            "per_seed": results,
        },
        args.out,
    )
    print("| setting | mIoU | pixels as defaults |\n|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['miou']:.4f} | {row['agreement']:.4f} |")


if __name__ == "__main__":
    main()
