"""Pretraining benchmarks: the contextual memory's step-time overhead, and what a short
CPU pretraining run does to retrieval on held-out synthetic scenes.

    python benchmarks/pretrain.py steptime     # tiny + small ViT, with / without memory
    python benchmarks/pretrain.py synthetic    # every objective, tiny ViT, mIoU before/after

``steptime`` times full optimizer steps of the Hummingbird objective (online forward and
backward on two views, target forward, EMA, memory push) on random images, with
``contextualize`` on and off, and reports the overhead of the memory.

``synthetic`` pretrains the tiny ViT from the same random initialisation with each
objective (and Hummingbird without contextualisation) on seeded synthetic scenes and
measures retrieval mIoU (eq. 1, k = 30, β = 0.02) on held-out prompt/query scenes
before and after, every ``--eval-every`` steps.

Writes JSON to ``benchmarks/results/pretrain_<mode>.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, write_report

from hbird.pretrain import Batch, PretrainConfig, Trainer
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.evaluation import RetrievalProbe, synthetic_set
from hbird.pretrain.hummingbird import HummingbirdConfig
from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options

RESULTS = Path(__file__).parent / "results"

MODELS = {
    "tiny": {"arch": TINY_ARCH, "model_kwargs": TINY_VIT_KWARGS, "crop": 64, "batch": 64,
             "options": tiny_options("hummingbird")},
    "small": {"arch": "vit_small_patch16_224", "model_kwargs": {}, "crop": 224, "batch": 32,
              "options": {}},
}  # fmt: skip

OBJECTIVE_RUNS = {  # name → (objective, option overrides)
    "hummingbird": ("hummingbird", {}),
    "hummingbird_no_context": ("hummingbird", {"contextualize": False}),
    "hummingbird++": ("hummingbird++", {}),
    "local_global": ("local_global", {}),
    "ibot": ("ibot", {}),
    "co2": ("co2", {}),
}


# -- step time -------------------------------------------------------------------------------


def build_trainer(model: dict[str, Any], contextualize: bool, memory_size: int) -> Trainer:
    options = {**model["options"], "contextualize": contextualize, "memory_size": memory_size}
    config = PretrainConfig(
        objective="hummingbird",
        objective_options=options,
        arch=model["arch"],
        model_kwargs=model["model_kwargs"],
        steps=1000,
        batch_size=model["batch"],
        crop_size=model["crop"],
        out=tempfile.gettempdir(),  # never written: the benchmark calls train_step only
    )
    return Trainer(config, log=lambda _: None)


def steptime(args: argparse.Namespace) -> dict[str, Any]:
    """Interleave the steps of every variant so load changes on the machine hit all alike."""
    results = []
    for name in args.models:
        model = MODELS[name]
        default = model["options"].get("memory_size", HummingbirdConfig.memory_size)
        sizes = sorted({default, *(args.memory_sizes or [])})
        variants = {0: build_trainer(model, False, default)}
        variants.update({size: build_trainer(model, True, size) for size in sizes})
        gen = torch.Generator().manual_seed(0)
        b, s = model["batch"], model["crop"]
        views = [torch.randn(b, 3, s, s, generator=gen) for _ in range(2)]
        batch = Batch(views, torch.zeros(b, dtype=torch.long))
        times: dict[int, list[float]] = {k: [] for k in variants}
        for i in range(args.warmup + args.steps):
            for key, trainer in variants.items():
                start = time.perf_counter()
                trainer.train_step(batch)
                if i >= args.warmup:
                    times[key].append(time.perf_counter() - start)
        base = statistics.median(times[0])
        print(f"{name}: no memory {base:.3f} s/step", flush=True)
        for size in sizes:
            median = statistics.median(times[size])
            overhead = median / base - 1.0
            print(
                f"{name}: memory {size}: {median:.3f} s/step (+{100 * overhead:.1f}%)", flush=True
            )
            results.append({
                "model": name, "arch": model["arch"], "model_kwargs": model["model_kwargs"],
                "batch": model["batch"], "crop": model["crop"], "memory_size": size,
                "step_seconds_without_memory": base, "step_seconds_with_memory": median,
                "overhead": overhead, "times_without": times[0], "times_with": times[size],
            })  # fmt: skip
        del variants
    return {"mode": "steptime", "environment": environment(), "results": results}


# -- synthetic pretraining -------------------------------------------------------------------


def synthetic(args: argparse.Namespace) -> dict[str, Any]:
    scene = {"classes": args.classes, "colour_jitter": args.colour_jitter}
    images = SyntheticImages(n=args.images, seed=0, size=args.size, **scene)
    probe = RetrievalProbe(
        synthetic_set(args.eval_images, 100, args.size, **scene),
        synthetic_set(args.eval_images, 200, args.size, **scene),
        image_size=args.size,
        k=30,
        temperature=0.02,
    )
    runs = {}
    for run_name in args.objectives:
        objective, overrides = OBJECTIVE_RUNS[run_name]
        with tempfile.TemporaryDirectory() as out:
            config = PretrainConfig(
                objective=objective,
                objective_options=tiny_options(objective, **overrides),
                arch=TINY_ARCH,
                model_kwargs=TINY_VIT_KWARGS,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=args.lr,
                crop_size=args.size,
                num_workers=args.workers,
                eval_every=args.eval_every,
                log_every=args.eval_every,
                seed=0,
                out=out,
            )
            start = time.perf_counter()
            Trainer(config, images=images, probe=probe, log=lambda _: None).fit()
            seconds = time.perf_counter() - start
            records = [
                json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()
            ]
        curve = [
            {"step": r["step"], "miou": r["eval/miou"], "loss": r.get("loss")}
            for r in records
            if "eval/miou" in r
        ]
        runs[run_name] = {
            "objective": objective,
            "options": config.objective_options,
            "miou_random_init": curve[0]["miou"],
            "miou_final": curve[-1]["miou"],
            "miou_best": max(c["miou"] for c in curve),
            "curve": curve,
            "seconds": seconds,
        }
        print(f"{run_name}: mIoU {curve[0]['miou']:.4f} → {curve[-1]['miou']:.4f} "
              f"(best {runs[run_name]['miou_best']:.4f}) in {seconds:.0f} s", flush=True)  # fmt: skip
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "mode", "func")}
    return {"mode": "synthetic", "environment": environment(), "settings": settings, "runs": runs}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)"
    )
    parser.add_argument("--out", type=Path)
    sub = parser.add_subparsers(dest="mode", required=True)
    st = sub.add_parser("steptime", help="step time with and without the contextual memory")
    st.add_argument("--models", nargs="+", default=["tiny", "small"], choices=sorted(MODELS))
    st.add_argument("--memory-sizes", type=int, nargs="*", help="sizes besides the default")
    st.add_argument("--steps", type=int, default=5)
    st.add_argument("--warmup", type=int, default=2)
    st.set_defaults(func=steptime)
    sy = sub.add_parser("synthetic", help="retrieval mIoU before/after a short pretraining run")
    sy.add_argument(
        "--objectives", nargs="+", default=list(OBJECTIVE_RUNS), choices=list(OBJECTIVE_RUNS)
    )
    sy.add_argument("--steps", type=int, default=600)
    sy.add_argument("--batch-size", type=int, default=64)
    sy.add_argument("--lr", type=float, default=3e-4)
    sy.add_argument("--images", type=int, default=50_000, help="distinct pretraining scenes")
    sy.add_argument("--eval-images", type=int, default=32, help="prompt and query scenes each")
    sy.add_argument("--eval-every", type=int, default=150)
    sy.add_argument("--size", type=int, default=64)
    sy.add_argument("--classes", type=int, default=8)
    sy.add_argument("--colour-jitter", type=float, default=0.4)
    sy.add_argument("--workers", type=int, default=1)
    sy.set_defaults(func=synthetic)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    report = args.func(args)
    write_report(report, args.out or RESULTS / f"pretrain_{args.mode}.json")


if __name__ == "__main__":
    main()
