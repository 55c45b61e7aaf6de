"""The ``open-hbird`` preset against open-hummingbird-eval itself, on the same files.

Seeded synthetic scenes (non-square, ignored class boundaries) are written as PNGs; hbird
predicts them with the preset (first pass unaugmented, see below) and the peer, run in
its own process (``_open_hbird_peer.py``), builds its memory from the same files with
the same random tiny ViT. The script reports how far the patch soft labels of the
queries differ and how often their argmax agrees.

The peer's augmentation is off on both sides: the two augmentations differ by design
(docs/evaluation.md). The remaining differences are resampling: the peer resizes PIL
images (8-bit) and picks mask pixels by plain nearest neighbour, hbird resizes float
tensors and picks the centre pixel (nearest-exact).

    python benchmarks/open_hbird_peer.py --peer /work/shared/peers/open-hummingbird-eval
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _common import environment, settings, write_report
from PIL import Image

from hbird import InContextPredictor
from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.encoders.test_encoders import TINY_VIT
from hbird.eval.config import resolve_config

DEFAULT_OUT = Path(__file__).parent / "results" / "open_hbird_peer.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, required=True, help="open-hummingbird-eval folder")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--size", default="64x128", help="scene size HxW")
    p.add_argument("--prompt", type=int, default=24)
    p.add_argument("--queries", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args()


def write_scenes(folder: Path, scenes, prefix: str) -> list[str]:
    folder.mkdir(parents=True)
    stems = []
    for i, s in enumerate(scenes):
        stem = f"{prefix}{i:03d}"
        rgb = np.round(s.image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{stem}.png")
        Image.fromarray(s.mask.numpy().astype(np.uint8)).save(folder / f"{stem}_mask.png")
        stems.append(stem)
    return stems


def main() -> None:
    args = parse_args()
    height, width = (int(x) for x in args.size.split("x"))
    scenes = make_scenes(args.prompt + args.queries, seed=args.seed, num_classes=4,
                         size=(height, width), ignore_boundary=3)  # fmt: skip
    cfg = resolve_config("open-hbird", image_size=args.image_size, augment_first_epoch=False)
    encoder = create_encoder("test_vit")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        stems = {
            "prompt": write_scenes(work / "prompt", scenes[: args.prompt], "p"),
            "query": write_scenes(work / "query", scenes[args.prompt :], "q"),
        }
        setup = {
            **{
                split: [[f"{split}/{s}.png", f"{split}/{s}_mask.png"] for s in names]
                for split, names in stems.items()
            },  # fmt: skip
            "image_size": args.image_size,
            "num_classes": 4,
            "k": cfg.k,
            "model": {
                **TINY_VIT,
                "img_size": 64,
                "patch_size": 8,
                "num_classes": 0,
                "dynamic_img_size": True,
            },  # fmt: skip
        }
        (work / "setup.json").write_text(json.dumps(setup))
        torch.save(encoder.model.state_dict(), work / "model.pt")
        child = Path(__file__).with_name("_open_hbird_peer.py")
        subprocess.run([sys.executable, str(child), str(work), str(args.peer)], check=True)
        peer = torch.load(work / "peer_soft_labels.pt")  # (Q, h·w, C)

        kwargs = {**cfg.predictor_kwargs(), "encoder": encoder}
        p = InContextPredictor(**kwargs, progress=False)
        p.fit([work / image for image, _ in setup["prompt"]],
              [work / mask for _, mask in setup["prompt"]], num_classes=4)  # fmt: skip
        dense = p.predict_dense([work / image for image, _ in setup["query"]])
    ours = torch.stack([d.patch_labels.reshape(-1, d.patch_labels.shape[-1]) for d in dense])
    diff = (ours - peer.to(ours.dtype)).abs()
    result = {
        "soft_label_max_abs_diff": float(diff.max()),
        "soft_label_mean_abs_diff": float(diff.mean()),
        "patch_argmax_agreement": float((ours.argmax(-1) == peer.argmax(-1)).float().mean()),
        "patches": int(ours.shape[0] * ours.shape[1]),
    }
    print(result)
    report = {"environment": environment(), "settings": settings(args), "result": result}
    write_report(report, args.out)


if __name__ == "__main__":
    main()
