"""The encoder's CPU levers, each measured on equal work: same images, same weights.

Every variant encodes the same ``--images`` synthetic images through
``hbird.encoders.inference.encode_batches`` (the path banks and queries use); variants
run interleaved for ``--rounds`` rounds (reversed every other round) and report min and
median seconds per image, and how far their features are from the float32 reference
(max abs difference, mean cosine). Variants:

- ``fp32-b{B}``: float32 at batch size B (``--batches``);
- ``bf16-b{B}``: hbird's bf16 path (``autocast="bf16"``): bf16 autocast with the linear
  layers on prepacked oneDNN weights (:mod:`hbird.encoders.prepack`);
- ``bf16-autocast-b{B}``: bf16 autocast alone (``prepack=False``), the oracle of the above;
- ``bf16-gelu-fused``: hbird's bf16 path with each MLP's GELU run as oneDNN's epilogue of
  its first linear layer (in float32 on the accumulator, not on a bf16 output);
- ``bf16-model`` (``--bf16-model``): ``bf16_model=True``, the whole encoder in bf16
  (:mod:`hbird.encoders.bf16_model`): prepacked linears, prefix keys split off the
  attention; with its parts alone: ``bf16-model-unsplit`` (no split attention) and
  ``bf16-split-attn`` (autocast with the split attention);
- ``fp32-bf16-matmul``: float32 with oneDNN's bf16 math for float32 matmuls
  (``torch.backends.mkldnn.matmul.fp32_precision = "bf16"``);
- ``fp32-math-attn`` / ``fp32-channels-last`` (``--more``): timm's attention without
  ``F.scaled_dot_product_attention``; the input and patch conv in channels-last;
- ``fp32-compile`` / ``bf16-compile`` (``--compile``): ``encode_batches(compile=True)``,
  ``torch.compile`` with inductor's ``freezing`` (:mod:`hbird.encoders.compiled`); the
  compile time is reported apart and not counted.

``--agreement`` also fits an :class:`InContextPredictor` on synthetic scenes in float32
and in bf16 and reports the fraction of query pixels predicted alike, and both mIoUs.

    python benchmarks/encoder.py --threads 1 --batches 1,16 --images 16 --rounds 3
    python benchmarks/encoder.py --compile --agreement

Writes JSON to ``benchmarks/results/encoder.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
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
from hbird.encoders import bf16_model, create_encoder, prepack
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
    p.add_argument("--more", action="store_true", help="also SDPA off and channels-last")
    p.add_argument("--bf16-model", action="store_true", help="also the whole model in bf16")
    p.add_argument("--only", default=None, help="comma-separated variants (others skipped)")
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


def gelu_fused(encoder) -> contextlib.AbstractContextManager:
    """Each timm ``Mlp`` with a plain GELU runs fc1 + GELU as one oneDNN call (bf16 path)."""

    def fused(mlp: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        def forward(x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
            weight, bias = prepack._packed(mlp.fc1)
            rows = x.to(torch.bfloat16).reshape(-1, x.shape[-1])
            hidden = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "gelu", [], "none")
            hidden = mlp.norm(mlp.drop1(hidden.reshape(*x.shape[:-1], -1)))
            return mlp.drop2(mlp.fc2(hidden))

        return forward

    @contextlib.contextmanager
    def patched():
        mlps = [m for m in encoder.modules() if type(m).__name__ == "Mlp"
                and type(m.act) is torch.nn.GELU and m.act.approximate == "none"]  # fmt: skip
        for mlp in mlps:
            mlp.forward = fused(mlp)
        try:
            yield
        finally:
            for mlp in mlps:
                del mlp.forward

    return patched()


def variants(encoder, images, args) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """Name → a call that encodes ``images`` once with that lever."""

    def run(batch: int, autocast: str | None = None, **options) -> Callable[[], list[torch.Tensor]]:
        return lambda: encode_batches(
            encoder, images, batch_size=batch, autocast=autocast, **options
        )

    def within(context: Callable[[], Any], call: Callable[[], list[torch.Tensor]]):
        def inner() -> list[torch.Tensor]:
            with context():
                return call()

        return inner

    batches = [int(b) for b in args.batches.split(",")]
    out: dict[str, Callable[[], list[torch.Tensor]]] = {}
    for b in batches:
        out[f"fp32-b{b}"] = run(b)
        out[f"bf16-b{b}"] = run(b, "bf16")
        out[f"bf16-autocast-b{b}"] = run(b, "bf16", prepack=False)
    best = max(batches)
    out["bf16-gelu-fused"] = within(lambda: gelu_fused(encoder), run(best, "bf16"))

    @contextlib.contextmanager
    def bf16_matmul():
        before = torch.backends.mkldnn.matmul.fp32_precision
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        try:
            yield
        finally:
            torch.backends.mkldnn.matmul.fp32_precision = before

    out["fp32-bf16-matmul"] = within(bf16_matmul, run(best))
    if args.bf16_model:
        out.update(bf16_model_variants(encoder, images, best))
    if args.more:
        out.update(more_variants(encoder, images, best))
    if args.compile:  # hbird's compile=True (hbird.encoders.compiled)
        out["fp32-compile"] = run(best, compile=True)
        out["bf16-compile"] = run(best, "bf16", compile=True)
    if args.only:  # the references (float32, bf16 autocast at the first batch) stay
        keep = {f"fp32-b{batches[0]}", f"bf16-autocast-b{batches[0]}", *args.only.split(",")}
        out = {name: call for name, call in out.items() if name in keep}
    return out


def bf16_model_variants(encoder, images, batch: int) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """The whole model in bf16, and each of its two parts alone."""
    copy = bf16_model.bf16_copy(encoder)

    def unsplit() -> list[torch.Tensor]:  # bf16 weights, prepacked; timm's own attention
        with prepack.prepacked_linears(copy):
            return encode_batches(copy, images, batch_size=batch)

    def split_only() -> list[torch.Tensor]:  # autocast, with the attention split
        with bf16_model.split_attention():
            return encode_batches(encoder, images, batch_size=batch, autocast="bf16")

    def whole() -> list[torch.Tensor]:  # hbird's bf16_model=True
        return encode_batches(encoder, images, batch_size=batch, autocast="bf16", bf16_model=True)

    return {"bf16-model": whole, "bf16-model-unsplit": unsplit, "bf16-split-attn": split_only}


def more_variants(encoder, images, batch: int) -> dict[str, Callable[[], list[torch.Tensor]]]:
    """SDPA off, and channels-last: measured before, no win (docs/performance.md)."""
    model = encoder.model

    def math_attention() -> list[torch.Tensor]:
        set_fused_attention(model, False)
        try:
            return encode_batches(encoder, images, batch_size=batch)
        finally:
            set_fused_attention(model, True)

    conv = model.patch_embed.proj

    def channels_last() -> list[torch.Tensor]:
        """encode_batches' loop, with each batch and the patch conv in channels-last."""
        conv.to(memory_format=torch.channels_last)
        features = []
        try:
            for start in range(0, len(images), batch):
                x = torch.stack(images[start : start + batch])
                with torch.inference_mode():
                    x = encoder.normalize(x).contiguous(memory_format=torch.channels_last)
                    features.extend(f.clone() for f in encoder.forward_patches(x).unbind(0))
        finally:
            conv.to(memory_format=torch.contiguous_format)
        return features

    return {"fp32-math-attn": math_attention, "fp32-channels-last": channels_last}


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
    names = list(calls)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in calls}  # this process's CPU
    compile_seconds: dict[str, float] = {}
    first = args.batches.split(",")[0]  # fp32 and bf16 autocast at the first batch size
    base, bf16_base = f"fp32-b{first}", f"bf16-autocast-b{first}"
    # warm-up, and the references: float32, and bf16 autocast alone (hbird's former path)
    references = {"fp32": calls[base](), "bf16_autocast": calls[bf16_base]()}
    for name, call in calls.items():
        if "compile" in name:  # the first call compiles
            start = time.perf_counter()
            call()
            compile_seconds[name] = time.perf_counter() - start
            print(f"{name}: compiled in {compile_seconds[name]:.1f} s", flush=True)
    results: dict[str, dict[str, Any]] = {}
    for round_ in range(args.rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            start, cpu = time.perf_counter(), time.process_time()
            features = calls[name]()
            seconds[name].append((time.perf_counter() - start) / len(images))
            cpu_seconds[name].append((time.process_time() - cpu) / len(images))
            if round_ == 0:
                results[name] = {f"vs_{k}": fidelity(features, v) for k, v in references.items()}
            print(f"round {round_ + 1} {name}: {seconds[name][-1]:.3f} s/image "
                  f"({cpu_seconds[name][-1]:.3f} s CPU)", flush=True)  # fmt: skip
    print(f"| variant | s / image, min | median | CPU s / image, min | median "
          f"| speed-up vs {base} (median) | vs float32: max abs diff, cosine | vs bf16 autocast |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        s, c, r = seconds[name], cpu_seconds[name], results[name]
        r.update(min=min(s), median=statistics.median(s), runs=s, cpu_min=min(c),
                 cpu_median=statistics.median(c), cpu_runs=c,
                 speedup=statistics.median(seconds[base]) / statistics.median(s))  # fmt: skip
        print(f"| {name} | {r['min']:.3f} | {r['median']:.3f} | {r['cpu_min']:.3f} | "
              f"{r['cpu_median']:.3f} | {r['speedup']:.2f} | "
              f"{describe(r['vs_fp32'])} | {describe(r['vs_bf16_autocast'])} |")  # fmt: skip
    report: dict[str, Any] = {"environment": environment(), "settings": settings(args),
                              "variants": results, "compile_seconds": compile_seconds}  # fmt: skip
    if args.agreement:
        report["agreement"] = agreement(encoder, args)
        print("bf16 vs float32 predictions:", report["agreement"])
    write_report(report, args.out)


def describe(fid: dict[str, Any]) -> str:
    if fid["identical"]:
        return "identical"
    return f"{fid['max_abs_diff']:.2e}, {fid['mean_cosine']:.6f}"


if __name__ == "__main__":
    main()
