"""Benchmark the long-range backbones against ViT-S/16: cost per image at 224 and 512 px.

For every model and input side: parameters, multiply-adds counted on the real module
(``torch.utils.flop_counter.FlopCounterMode``; MACs = FLOPs / 2, batch 1), forward time per
image (best of ``--repeats``, ``torch.no_grad``) and peak memory per image (the growth of
the peak resident set over a forward pass, measured in a fresh subprocess per model and
size, divided by the batch). Parameters and MACs at 224 are compared with the thesis'
Table 3.1 where it lists the model. Rows:

- ``axial_resnet_s``: Axial-ResNet-S with its 1000-class classifier (Table 3.1's
  Conv-Stem + Axial-Attention, 12.4M / 2.8B);
- ``axial_deeplab_s``: the encoder hbird uses (output stride 16, span 65, no classifier);
- ``elastic_resnext50``: ELASTIC-ResNeXt-50 at output stride 32 without its classifier
  (Table A.3: 25.2M / 4.2B with it; the 1000-class fc adds 2.05M and 2.0M MACs);
- ``vit_small_patch16_224``: timm, random weights, through the encoder contract;
- ``resnet50``: timm's, with classifier (Table 3.1: 25.6M / 4.1B), a check of the counter.

    python benchmarks/backbones.py                  # a few minutes on 2 cores
    python benchmarks/backbones.py --sizes 224 --models axial_resnet_s resnet50
    python benchmarks/backbones.py --accounting     # Axial-ResNet parameters vs Table B.3

``--accounting`` splits the parameters of Axial-ResNet at the four widths of the thesis'
Table B.3 into projections, classifier, batch norms and relative-embedding tables, and
prints the gap to the table (docs/backbones.md explains it).

Writes JSON to ``benchmarks/results/backbones.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from _common import child_row, environment, peak_rss_bytes, set_threads, settings, write_report

DEFAULT_OUT = Path(__file__).parent / "results" / "backbones.json"
TABLE_3_1 = {  # thesis Table 3.1 (ImageNet, 224 px): params (M), multiply-adds (B)
    "axial_resnet_s": {"row": "Conv-Stem + Axial-Attention", "params_m": 12.4, "macs_b": 2.8},
    "resnet50": {"row": "ResNet-50", "params_m": 25.6, "macs_b": 4.1},
}
TABLE_B_3 = {0.375: 7.4, 0.5: 12.4, 0.75: 26.4, 1.0: 45.6}
"""Thesis Table B.3: Conv-Stem + Axial-Attention parameters (M) by width multiplier."""
MODELS = (
    "axial_resnet_s",
    "axial_deeplab_s",
    "elastic_resnext50",
    "vit_small_patch16_224",
    "resnet50",
)


def build(name: str) -> torch.nn.Module | None:
    """The module benchmarked for ``name`` (eval mode), or None when it is not available."""
    torch.manual_seed(0)
    if name == "axial_resnet_s":
        from hbird.nn.axial_resnet import axial_resnet

        return axial_resnet("s", num_classes=1000).eval()
    if name == "resnet50":
        import timm

        return timm.create_model("resnet50").eval()
    if name == "elastic_resnext50":
        from hbird.nn.elastic import build_elastic

        return build_elastic("elastic_resnext50", output_stride=32).eval()  # Table A.3, no fc
    from hbird.encoders import create_encoder

    return create_encoder(name, pretrained=False)


def run_model(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "forward_patches"):  # an hbird encoder: its patch features
        return model.forward_patches(model.normalize(x))
    return model(x)


def multiply_adds(model: torch.nn.Module, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        run_model(model, torch.rand(1, 3, side, side))
    return counter.get_total_flops() / 2


def measure_one(name: str, side: int, batch: int, repeats: int) -> dict[str, Any]:
    """Everything about one model at one size (run in its own process for the memory)."""
    model = build(name)
    x = torch.rand(batch, 3, side, side)
    before = peak_rss_bytes()
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            start = time.perf_counter()
            run_model(model, x)
            times.append(time.perf_counter() - start)
    peak = peak_rss_bytes() - before
    params = sum(p.numel() for p in model.parameters())
    row = {
        "model": name,
        "side": side,
        "params_m": params / 1e6,
        "macs_b": multiply_adds(model, side) / 1e9,
        "seconds_per_image": min(times) / batch,
        "peak_mb_per_image": peak / batch / 2**20,
    }
    if side == 224 and name in TABLE_3_1:
        ref = TABLE_3_1[name]
        row["table_3_1"] = ref
        row["params_vs_table"] = row["params_m"] / ref["params_m"] - 1
        row["macs_vs_table"] = row["macs_b"] / ref["macs_b"] - 1
    return row


def parameter_groups(model: torch.nn.Module) -> dict[str, int]:
    """Parameters of an AxialResNet by kind: stem, projections (1×1 convolutions and q/k/v),
    fc, batch norms, relative-embedding tables."""
    groups = dict.fromkeys(("stem", "projections", "fc", "batch_norms", "tables"), 0)
    kinds = {n: type(m) for n, m in model.named_modules()}
    for key, p in model.named_parameters():
        owner = key.rsplit(".", 1)[0]
        if key.rsplit(".", 1)[-1] in ("rel_q", "rel_k", "rel_v"):
            kind = "tables"
        elif key.startswith(("conv1.", "bn1.")):
            kind = "stem"
        elif key.startswith("fc."):
            kind = "fc"
        elif issubclass(kinds[owner], torch.nn.modules.batchnorm._BatchNorm):
            kind = "batch_norms"
        else:
            kind = "projections"
        groups[kind] += p.numel()
    return groups


def accounting() -> list[dict[str, Any]]:
    """Axial-ResNet (+ 1000-class fc) at Table B.3's widths, parameters by kind and the gap."""
    from hbird.nn.axial_resnet import AxialResNet

    rows = []
    print("width   total     proj      fc     BN    tables   B.3    gap   gap/width")
    for width, table in TABLE_B_3.items():
        groups = parameter_groups(AxialResNet(width=width, num_classes=1000))
        total = sum(groups.values()) / 1e6
        gap = table - total
        rows.append({"width": width, **groups, "total_m": total, "table_b_3_m": table})
        print(
            f"{width:5.3f} {total:8.3f} {groups['projections'] / 1e6:8.3f} "
            f"{groups['fc'] / 1e6:6.3f} {groups['batch_norms'] / 1e6:6.3f} "
            f"{groups['tables'] / 1e6:6.3f} {table:6.1f} {gap:6.3f} {gap / width:6.3f}"
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 512])
    parser.add_argument("--batch", type=int, default=1, help="images per forward pass")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--accounting", action="store_true", help="parameters vs Table B.3")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "SIDE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    if args.accounting:
        out = (
            DEFAULT_OUT.with_name("backbones_accounting.json")
            if args.out == DEFAULT_OUT
            else args.out
        )
        write_report({"environment": environment(), "accounting": accounting()}, out)
        return
    if args.one:  # the child process: one measurement, as JSON on stdout
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.batch, args.repeats)))
        return
    rows = []
    for name in args.models:
        for side in args.sizes:
            child = [sys.executable, __file__, "--one", name, str(side)]
            child += ["--batch", str(args.batch), "--repeats", str(args.repeats)]
            child += ["--threads", str(args.threads)]
            row = child_row(child)
            if "error" in row:
                raise SystemExit(f"{name} at {side}: {row['error']}")
            rows.append(row)
            print(
                f"{name:24s} {side:4d}  {row['params_m']:7.2f}M  {row['macs_b']:7.2f}B MACs  "
                f"{row['seconds_per_image'] * 1e3:8.1f} ms  {row['peak_mb_per_image']:8.1f} MB"
            )
    write_report({"environment": environment(), "settings": settings(args), "rows": rows}, args.out)


if __name__ == "__main__":
    main()
