"""The encoder's CPU levers, each measured on equal work: same images, same weights.

Every variant encodes the same ``--images`` synthetic images through
``hbird.encoders.inference.encode_batches`` (the path banks and queries use); variants
run interleaved for ``--rounds`` rounds (reversed every other round) and report min and
median seconds per image, and how far their features are from the float32 reference
(max abs difference, mean cosine). Variants:

- ``fp32-b{B}``: float32 at batch size B (``--batches``);
- ``bf16-b{B}``: the same under ``torch.autocast(bfloat16)`` (``autocast="bf16"``);
- ``fp32-math-attn``: timm's attention without ``F.scaled_dot_product_attention``
  (``fused_attn=False``), to see what SDPA gives;
- ``fp32-channels-last``: the input and the patch embedding's conv in channels-last;
- ``fp32-compile`` / ``bf16-compile`` (``--compile``): ``torch.compile`` of the model (its
  compile time is reported apart and not counted).

``--agreement`` also fits an :class:`InContextPredictor` on synthetic scenes in float32
and in bf16 and reports the fraction of query pixels predicted alike, and both mIoUs.

    python benchmarks/encoder.py --threads 1                 # ~5 min on a loaded 2-core CPU
    python benchmarks/encoder.py --compile --agreement

Writes JSON to ``benchmarks/results/encoder.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import environment, set_threads, settings, write_report

from hbird import InContextPredictor
from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.encoders.inference import encode_batches
from hbird.metrics import ConfusionMatrix

DEFAULT_OUT = Path(__file__).parent / "results" / "encoder.json"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="vit_small_patch16_224")
    p.add_argument("--image-size", type=int, default=448)
    p.add_argument("--images", type=int, default=16, help="images per variant and round")
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes to try")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also try torch.compile")
    p.add_argument("--agreement", action="store_true", help="bf16 vs float32 predictions")
    p.add_argument("--agreement-images", default="40,20", help="prompt,query scenes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args()


def set_fused_attention(model: torch.nn.Module, enabled: bool) -> None:
    """Switch timm's attention blocks between SDPA and the explicit softmax(QKᵀ)V."""
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = enabled


def variants(encoder, images, args) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Name → a call that encodes ``images`` once with that lever."""

    def run(batch: int, autocast: str | None = None) -> Callable[[], list[torch.Tensor]]:
        return lambda: encode_batches(encoder, images, batch_size=batch, autocast=autocast)

    def with_model(change: Callable[[], None], undo: Callable[[], None], batch: int, autocast=None):
        def call() -> list[torch.Tensor]:
            change()
            try:
                return run(batch, autocast)()
            finally:
                undo()

        return call

    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Callable[[], list[torch.Tensor]]] = {}
    for b in batches:
        out[f"fp32-b{b}"] = run(b)
        out[f"bf16-b{b}"] = run(b, "bf16")
    best = max(batches)
    model = encoder.model
    out["fp32-math-attn"] = with_model(lambda: set_fused_attention(model, False),
                                       lambda: set_fused_attention(model, True), best)  # fmt: skip
    conv = model.patch_embed.proj

    def channels_last() -> list[torch.Tensor]:
        """encode_batches' loop, with each batch and the patch conv in channels-last."""
        conv.to(memory_format=torch.channels_last)
        features = []
        try:
            for start in range(0, len(images), best):
                batch = torch.stack(images[start : start + best])
                with torch.inference_mode():
                    x = encoder.normalize(batch).contiguous(memory_format=torch.channels_last)
                    features.extend(f.clone() for f in encoder.forward_patches(x).unbind(0))
        finally:
            conv.to(memory_format=torch.contiguous_format)
        return features

    out["fp32-channels-last"] = channels_last
    if args.compile:
        compiled = torch.compile(model)
        original = encoder.model

        def swap(m):
            return lambda: setattr(encoder, "model", m)

        out["fp32-compile"] = with_model(swap(compiled), swap(original), best)
        out["bf16-compile"] = with_model(swap(compiled), swap(original), best, "bf16")
    return out


def fidelity(features: list[torch.Tensor], reference: list[torch.Tensor]) -> dict[str, float]:
    a, b = torch.cat([f.flatten(0, 1) for f in features]), torch.cat([f.flatten(0, 1) for f in reference])  # fmt: skip
    return {
        "max_abs_diff": float((a - b).abs().max()),
        "mean_cosine": float(F.cosine_similarity(a, b, dim=-1).mean()),
        "identical": bool(torch.equal(a, b)),
    }


def agreement(encoder, args) -> dict[str, Any]:
    """Pixels of bf16 predictions equal to float32 ones, on the same fitted prompt."""
    n_prompt, n_query = (int(x) for x in args.agreement_images.split(","))
    side = args.image_size
    scenes = make_scenes(n_prompt + n_query, seed=0, num_classes=5, size=(side, side))
    prompt, queries = scenes[:n_prompt], scenes[n_prompt:]
    preds, mious = {}, {}
    for name, autocast in (("fp32", None), ("bf16", "bf16")):
        p = InContextPredictor(encoder=encoder, image_size=side, aug_epochs=1, memory_size=None,
                               index="exact", autocast=autocast, progress=False)  # fmt: skip
        p.fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=5)
        preds[name] = p.predict([s.image for s in queries])
        cm = ConfusionMatrix(5, ignore_index=255)
        for pred, s in zip(preds[name], queries):
            cm.update(pred, s.mask)
        mious[name] = cm.compute().miou
    same = sum(int((a == b).sum()) for a, b in zip(preds["bf16"], preds["fp32"]))
    total = sum(p.numel() for p in preds["fp32"])
    return {"pixel_agreement": same / total, "miou": mious, "prompt": n_prompt, "queries": n_query}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    torch.manual_seed(0)
    encoder = create_encoder(args.encoder)
    scenes = make_scenes(args.images, seed=1, num_classes=5, size=(args.image_size,) * 2)
    images = [s.image for s in scenes]
    calls = variants(encoder, images, args)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    compile_seconds: dict[str, float] = {}
    reference = calls["fp32-b1"]()  # warm-up, and the float32 reference features
    for name, call in calls.items():
        if "compile" in name:  # the first call compiles
            start = time.perf_counter()
            call()
            compile_seconds[name] = time.perf_counter() - start
    results: dict[str, dict[str, Any]] = {}
    names = list(calls)
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            features = calls[name]()
            seconds[name].append((time.perf_counter() - start) / len(images))
            if round_ == 0:
                results[name] = fidelity(features, reference)
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.3f} s/image", flush=True)
    base = statistics.median(seconds["fp32-b1"])
    print("| variant | s / image, min | median | speed-up (median) | max abs diff | cosine |")
    print("|---|---|---|---|---|---|")
    for name in names:
        s = seconds[name]
        r = results[name]
        r.update(
            min=min(s), median=statistics.median(s), runs=s, speedup=base / statistics.median(s)
        )
        print(f"| {name} | {r['min']:.3f} | {r['median']:.3f} | {r['speedup']:.2f} | "
              f"{r['max_abs_diff']:.2e} | {r['mean_cosine']:.5f} |")  # fmt: skip
    report: dict[str, Any] = {"environment": environment(), "settings": settings(args),
                              "variants": results, "compile_seconds": compile_seconds}  # fmt: skip
    if args.agreement:
        report["agreement"] = agreement(encoder, args)
        print("bf16 vs float32 predictions:", report["agreement"])
    write_report(report, args.out)


if __name__ == "__main__":
    main()
