"""Pixel agreement of cheaper settings with the paper's (float32, exact search).

compare_peer.py's setup (synthetic scenes at 448 px, a timm ViT with seeded random
weights, k = 30, β = 0.02, one augmentation epoch, every patch kept); each setting fits
its own predictor on the prompt scenes and predicts the query scenes. The first setting
is the reference; the others report the share of query pixels predicted as it predicts
them, the mIoU of both, and their wall times.

    python benchmarks/agreement.py --threads 2 \\
        --settings "index=exact" "index=exact:index_param.scoring=bf16" \\
                   "index=exact:autocast=bf16:index_param.scoring=bf16"
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _common import report_results, set_threads
from compare_peer import parse_options

from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.metrics.segmentation import ConfusionMatrix
from hbird.predictor import InContextPredictor

DEFAULT_OUT = Path(__file__).parent / "results" / "agreement.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=["index=exact", "index=exact:index_param.scoring=bf16"],
                   help="FIELD=VALUE:... predictor settings; the first is the reference")  # fmt: skip
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--classes", type=int, default=21)
    p.add_argument("--encoder", default="vit_small_patch16_224", help="timm ViT (random weights)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    set_threads(args.threads)
    side = args.image_size
    scenes = make_scenes(args.prompt + args.queries, seed=args.seed, num_classes=args.classes,
                         size=(side, side))  # fmt: skip
    prompt, queries = scenes[: args.prompt], scenes[args.prompt :]
    torch.manual_seed(args.seed)  # the same random weights for every setting
    encoder = create_encoder(args.encoder)
    reference: torch.Tensor | None = None
    results: dict[str, Any] = {}
    for setting in args.settings:
        options = parse_options(setting.split(":"))
        start = time.perf_counter()
        predictor = InContextPredictor(encoder, image_size=side, k=30, temperature=0.02,
                                       aug_epochs=1, memory_size=None, batch_size=args.batch_size,
                                       progress=False, **options)  # fmt: skip
        predictor.fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=args.classes)
        built = time.perf_counter()
        predictor.timings.reset()
        labels = torch.stack(predictor.predict([s.image for s in queries]))
        done = time.perf_counter()
        scores = ConfusionMatrix(args.classes)
        scores.update(labels, torch.stack([torch.as_tensor(s.mask) for s in queries]))
        reference = labels if reference is None else reference
        results[setting] = {
            "build_seconds": built - start,
            "predict_seconds": done - built,
            "stage_seconds": predictor.timings.reset(),
            "miou": scores.compute().miou,
            "pixel_agreement": float((labels == reference).double().mean()),
        }
        print(setting, results[setting], flush=True)
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    return report_results(args, run(args))


if __name__ == "__main__":
    main()
