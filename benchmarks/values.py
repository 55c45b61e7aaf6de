"""Dense against sparse bank values (``value_storage``) on a synthetic 150-class bank.

The values are the pooled labels of synthetic scenes (``make_scenes``, 150 classes, one
16-px patch per entry, as a bank of those scenes holds them), repeated up to
``--entries``. Reports:

- bytes per entry and the values' memory (dense ``N × C × 4``; sparse: slots, overflow
  ids and rows as held), and the share of patches holding 1, 2 or more classes;
- decode on equal work: ``--queries`` query patches × k neighbours drawn at random,
  their values gathered (``MemoryBank.gather_values``) and eq. 1 applied
  (``decode.aggregate``), ``--rounds`` interleaved rounds, min and median; the outputs
  are compared bit for bit.

    python benchmarks/values.py                        # ~1 min
    python benchmarks/values.py --entries 1000000 --rounds 5

Writes JSON to ``benchmarks/results/values.json`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, set_threads, settings, write_report

from hbird.data.synthetic import make_scenes
from hbird.decode import aggregate, softmax_over_neighbours
from hbird.labelspec import LabelSpec
from hbird.memory.bank import MemoryBank
from hbird.memory.labels import pool_labels

DEFAULT_OUT = Path(__file__).parent / "results" / "values.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--scenes", type=int, default=64, help="scenes pooled to patches")
    parser.add_argument("--scene-size", type=int, default=448)
    parser.add_argument("--entries", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=1024, help="query patches per decode")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return parser.parse_args(argv)


def patch_values(args: argparse.Namespace, spec: LabelSpec) -> torch.Tensor:
    """``(n, C)`` pooled labels of the synthetic scenes' 16-px patches."""
    side = args.scene_size
    scenes = make_scenes(args.scenes, seed=0, num_classes=args.classes, size=(side, side))
    rows = [pool_labels(s.mask, 16, spec)[0] for s in scenes]
    return torch.cat(rows)


def build(storage: str, values: torch.Tensor, spec: LabelSpec, n: int) -> MemoryBank:
    """A bank of ``n`` entries (1-d keys: only the values are measured) in ``storage``."""
    bank = MemoryBank(1, spec, {"name": "none"}, value_storage=storage)
    bank.reserve(n)
    for start in range(0, n, values.shape[0]):
        piece = values[: min(values.shape[0], n - start)]
        bank.append(torch.ones(piece.shape[0], 1), piece)
    return bank


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    spec = LabelSpec(task="segmentation", num_classes=args.classes)
    values = patch_values(args, spec)
    classes_held = (values != 0).sum(1)
    banks = {s: build(s, values, spec, args.entries) for s in ("dense", "sparse")}
    report: dict[str, Any] = {"config": settings(args), "environment": environment()}
    report["patches_holding"] = {
        "1 class": float((classes_held == 1).float().mean()),
        "2 classes": float((classes_held == 2).float().mean()),
        "3 or more": float((classes_held > 2).float().mean()),
    }
    report["bytes_per_entry"] = {s: b._values.entry_bytes() for s, b in banks.items()}
    report["values_mib"] = {
        s: b._values.entry_bytes() * args.entries / 2**20 for s, b in banks.items()
    }
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.entries, (args.queries, args.k), generator=gen)
    weights = softmax_over_neighbours(torch.rand(args.queries, args.k, generator=gen), 0.02)
    outputs, seconds = {}, {s: [] for s in banks}
    for r in range(args.rounds):
        for storage in list(banks)[:: 1 if r % 2 == 0 else -1]:  # interleaved, reversed
            start = time.perf_counter()
            outputs[storage] = aggregate(weights, banks[storage].gather_values(ids))
            seconds[storage].append(time.perf_counter() - start)
    report["decode_seconds"] = {
        s: {"min": min(t), "median": statistics.median(t)} for s, t in seconds.items()
    }
    report["decode_sparse_over_dense"] = {
        m: report["decode_seconds"]["sparse"][m] / report["decode_seconds"]["dense"][m]
        for m in ("min", "median")
    }
    report["identical_outputs"] = torch.equal(outputs["dense"], outputs["sparse"])
    held = ", ".join(f"{k} {v:.1%}" for k, v in report["patches_holding"].items())
    print(f"{args.entries} entries, {args.classes} classes; patches holding {held}")
    for s in banks:
        t = report["decode_seconds"][s]
        print(f"{s}: {report['bytes_per_entry'][s]:.1f} B/entry, values "
              f"{report['values_mib'][s]:.1f} MiB; decode {args.queries}x{args.k}: "
              f"{t['min'] * 1e3:.1f} ms min, {t['median'] * 1e3:.1f} ms median")  # fmt: skip
    ratio = report["decode_sparse_over_dense"]
    print(f"sparse / dense decode time: {ratio['min']:.2f} min, {ratio['median']:.2f} median; "
          f"identical outputs: {report['identical_outputs']}")  # fmt: skip
    write_report(report, args.out)
    return report


if __name__ == "__main__":
    main()
