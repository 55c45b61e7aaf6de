"""hbird against open-hummingbird-eval on the same inputs: issue 15's table.

Seeded synthetic scenes (square, so nothing is resized) are written once as PNGs with a
timm ViT's random weights; then every row runs in its own process, rows interleaved
(reversed every other round, so drift on a shared machine falls on every row alike):

- ``peer:faiss``: open-hummingbird-eval with an exact CPU faiss ``IndexFlatIP`` (its own
  faiss backend is GPU-only), ``peer:scann``: its default ScaNN;
- ``hbird:exact``, ``hbird:auto`` (or any ``hbird:<index>``): ``hbird.eval.evaluate``.

Both sides: k neighbours, β, one unaugmented memory pass, every patch kept. The peer runs
from its own folder (``--peer``, never one of hbird's dependencies) through
``_open_hbird_peer.py``; if it cannot run, the script says why and runs hbird alone.

Each row reports memory build seconds (images read, encoded, index built), evaluation
seconds (queries read, encoded, searched, decoded, scored), the search seconds inside
it, the process's peak RSS, the RSS after half and all of the queries, and mIoU: hbird's
own and the peer's Hungarian-matched one (they differ by definition; both are printed).

    python benchmarks/compare_peer.py --quick        # ~2 min: 20 + 10 images at 224
    python benchmarks/compare_peer.py                # issue 15's setup: ~20 min a round
    python benchmarks/compare_peer.py --peer ~/src/open-hummingbird-eval --rounds 3

Writes JSON to ``benchmarks/results/compare_peer.json`` and the markdown table next to
it (``.md``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import environment, peak_rss_bytes, rss_bytes, set_threads, settings, write_report

from hbird.data.folder import FolderDataset
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.encoders import create_encoder
from hbird.eval import evaluate
from hbird.io.options import parse_value

ROOT = Path(__file__).resolve().parents[1]
PEER_PLACES = [up / "shared" / "peers" / "open-hummingbird-eval" for up in ROOT.parents[:2]]
DEFAULT_PEER = next((p for p in PEER_PLACES if p.is_dir()), PEER_PLACES[0])
"""``../shared/peers/open-hummingbird-eval`` beside the checkout (or beside its parent,
for a git worktree one level deeper)."""
DEFAULT_OUT = Path(__file__).parent / "results" / "compare_peer.json"
ROWS = "peer:faiss,hbird:exact,peer:scann,hbird:auto"
LABELS = {
    "peer:faiss": "open-hummingbird-eval, exact (faiss `IndexFlatIP`)",
    "peer:scann": "open-hummingbird-eval, default ScaNN",
    "peer:torch": "open-hummingbird-eval, exact (torch matmul + top-k)",
}
QUICK = {"prompt": 20, "queries": 10, "image_size": 224}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", type=Path, default=DEFAULT_PEER, help="open-hummingbird-eval folder")
    p.add_argument("--rows", default=ROWS, help="comma-separated peer:<faiss|scann|torch>[:VAR=VALUE...] "
                   "and hbird:<index>[:FIELD=VALUE...] rows, run in this order")  # fmt: skip
    p.add_argument("--encoder", default="vit_small_patch16_224", help="timm ViT (random weights)")
    p.add_argument("--image-size", type=int, default=448, help="scene side (square)")
    p.add_argument("--prompt", type=int, default=200)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=8, help="images per forward, both sides")
    p.add_argument("--hbird-option", action="append", default=[], metavar="FIELD=VALUE",
                   help="an extra EvalConfig field for the hbird rows (e.g. autocast=bf16)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds (min and median)")
    p.add_argument("--threads", type=int, default=2, help="torch/faiss threads per process")
    p.add_argument("--quick", action="store_true", help=f"reduced size: {QUICK}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--child", nargs=3, metavar=("WORK", "INDEX", "RESULT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
    return args


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """``["autocast=bf16", "batch_size=16"]`` → ``{"autocast": "bf16", "batch_size": 16}``;
    ``index_param.scoring=bf16`` → ``{"index_params": {"scoring": "bf16"}}``;
    ``feature_option.compile=true`` → ``{"feature_options": {"compile": True}}``."""
    options: dict[str, Any] = {}
    groups = {"index_param.": "index_params", "feature_option.": "feature_options"}
    for pair in pairs:
        name, _, value = pair.partition("=")
        parsed = parse_value(value)
        prefix = next((p for p in groups if name.startswith(p)), None)
        if prefix is not None:
            options.setdefault(groups[prefix], {})[name.removeprefix(prefix)] = parsed
        else:
            options[name] = parsed
    return options


class RssAtQueries:
    """A query dataset that records this process's RSS when query ``i`` is read (i done);
    with ``workers`` the queries are read in worker processes and only the end is kept."""

    files_checked = True  # the parent wrote these files; checking would unwrap us
    peak_at_first_query = None  # read in a worker process with --workers: not seen here

    def __init__(self, dataset: FolderDataset) -> None:
        self.dataset, self.samples = dataset, {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        self.samples[i] = rss_bytes()
        if i == 0:  # the memory is built: the peak so far is the build's
            self.peak_at_first_query = peak_rss_bytes()
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)


def run_hbird(work: Path, setting: str, result: Path) -> None:
    """Child process: one hbird evaluation on the files in ``work``, timed.

    ``setting`` is ``INDEX`` or ``INDEX:FIELD=VALUE:...`` (fields of ``EvalConfig``)."""
    index, *row_options = setting.split(":")
    setup = json.loads((work / "setup.json").read_text())
    set_threads(setup["threads"])
    encoder = create_encoder(setup["timm_model"])
    encoder.model.load_state_dict(torch.load(work / "model.pt"))
    root = work / "folder"
    prompt = FolderDataset(root, split="train", task="segmentation")
    queries = RssAtQueries(FolderDataset(root, split="val", task="segmentation"))
    rss_before = rss_bytes()
    start = time.perf_counter()
    fixed = {"image_size": setup["image_size"], "k": setup["k"], "temperature": setup["temperature"],
             "aug_epochs": 1, "memory_size": None, "batch_size": setup["batch_size"]}  # fmt: skip
    # a row's own options (e.g. batch_size=16, workers=1) win over the shared setup
    options = {**fixed, **setup["hbird_options"], **parse_options(row_options)}
    report = evaluate(encoder, (prompt, queries), progress=False, index=index, **options)
    total = time.perf_counter() - start
    done = report.counts["queries"]
    stages = {k[len("per_query_") :]: v * done for k, v in report.timings.items() if k.startswith("per_query_")}  # fmt: skip
    out = {
        "build_seconds": report.timings["build_memory"],
        "eval_seconds": sum(stages.values()),
        "search_seconds": stages.get("search", 0.0),
        "stage_seconds": stages,
        "total_seconds": total,
        "miou": report.metrics["miou"],
        "memory_entries": report.counts["memory_entries"],
        "queries": done,
        "index": report.search,
        "rss_bytes_after_queries": {**queries.samples, done: rss_bytes()},
        "rss_bytes_before_build": rss_before,
        "peak_rss_bytes_after_build": queries.peak_at_first_query,
        # float16 keys (N, D) and float32 soft labels (N, C): what a streamed build must hold
        "bank_bytes": report.counts["memory_entries"]
        * (2 * encoder.embed_dim + 4 * setup["num_classes"]),
        "peak_rss_bytes": peak_rss_bytes(),
    }
    result.write_text(json.dumps(out, default=str))


def write_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """PNG scenes in hbird's folder format, the random weights, and the peer's setup."""
    side = args.image_size
    scenes = make_scenes(args.prompt + args.queries, seed=args.seed, num_classes=args.classes,
                         size=(side, side))  # fmt: skip
    root = work / "folder"
    write_scene_folder(root / "train", scenes[: args.prompt], with_depth=False)
    write_scene_folder(root / "val", scenes[args.prompt :], with_depth=False, prefix="val")
    torch.manual_seed(args.seed)  # the same random weights for every row
    encoder = create_encoder(args.encoder)
    torch.save(encoder.model.state_dict(), work / "model.pt")

    def pairs(split: str) -> list[list[str]]:
        images = sorted((root / split / "images").glob("*.png"))
        return [[str(p.relative_to(work)), str(p.parent.parent.relative_to(work) / "masks" / p.name)]
                for p in images]  # fmt: skip

    setup = {
        "prompt": pairs("train"),
        "query": pairs("val"),
        "image_size": side,
        "num_classes": args.classes,
        "k": args.k,
        "temperature": args.temperature,
        "timm_model": args.encoder,
        "threads": args.threads,
        "batch_size": args.batch_size,
        "hbird_options": parse_options(args.hbird_option),
        "details": False,
    }
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


def run_row(row: str, work: Path, peer: Path) -> dict[str, Any]:
    """Run one row in its own process; its result, or ``{"error": ...}``."""
    side, _, setting = row.partition(":")
    result = work / f"result_{side}_{setting.replace(':', '_').replace('=', '-')}.json"
    result.unlink(missing_ok=True)
    env = dict(os.environ)
    if side == "peer":  # peer:faiss[:VARIABLE=VALUE...]: the peer under that environment
        nn, *variables = setting.split(":")
        env.update(v.split("=", 1) for v in variables)
        setup = json.loads((work / "setup.json").read_text())
        (work / "setup.json").write_text(json.dumps({**setup, "nn": nn, "result": result.name}))
        child = [str(Path(__file__).with_name("_open_hbird_peer.py")), str(work), str(peer)]
    else:
        child = [str(Path(__file__)), "--child", str(work), setting, str(result)]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *child], capture_output=True, text=True, env=env)
    if done.returncode != 0 or not result.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"error": " / ".join(tail) or f"exit status {done.returncode}"}
    return {**json.loads(result.read_text()), "process_seconds": time.perf_counter() - start}


def peer_problem(peer: Path) -> str | None:
    """Why the peer cannot run from ``peer`` (None if it looks runnable)."""
    if not (peer / "hbird" / "hbird_eval.py").is_file():
        return f"no open-hummingbird-eval at {peer} (hbird/hbird_eval.py missing); pass --peer DIR"
    return None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Min and median of every timing and memory field over the rounds."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[-1]["error"]}
    out: dict[str, Any] = {"rounds": len(ok)}
    for key in ("build_seconds", "eval_seconds", "search_seconds", "peak_rss_bytes"):
        values = [r[key] for r in ok]
        out[key] = {"min": min(values), "median": statistics.median(values)}
    last = ok[-1]
    peak_after_build = last["peak_rss_bytes_after_build"] or last["peak_rss_bytes"]
    out["build_growth_bytes"] = peak_after_build - last["rss_bytes_before_build"]
    # the peak over what the process held with its libraries and model loaded
    out["working_bytes"] = last["peak_rss_bytes"] - last["rss_bytes_before_build"]
    out["rss_bytes_before_build"] = last["rss_bytes_before_build"]
    for key in ("miou", "miou_hungarian", "memory_entries", "queries", "bank_bytes", "stage_seconds",
                "index"):  # fmt: skip
        if key in last:
            out[key] = last[key]
    samples = {int(n): b for n, b in last["rss_bytes_after_queries"].items()}
    if samples:
        half = min((n for n in samples if n >= last["queries"] // 2), default=max(samples))
        out["rss_bytes_at_half_queries"] = [half, samples[half]]
        out["rss_bytes_at_all_queries"] = [max(samples), samples[max(samples)]]
    return out


def row_label(row: str) -> str:
    """``hbird:exact:autocast=bf16`` → ``hbird, `index=exact`, autocast=bf16``."""
    if row in LABELS:
        return LABELS[row]
    if row.startswith("peer:"):  # peer:faiss:OPENBLAS_CORETYPE=SkylakeX
        side, nn, *variables = row.split(":")
        return ", ".join([LABELS.get(f"{side}:{nn}", row), *(f"`{v}`" for v in variables)])
    index, *options = row.partition(":")[2].split(":")
    return ", ".join([f"hbird, `index={index}`", *options])


def markdown(rows: dict[str, dict[str, Any]]) -> str:
    """The issue's table: min (median) of each timing; peak RSS; mIoU."""

    def span(s: dict[str, float], scale: float = 1.0, unit: str = "s") -> str:
        return f"{s['min'] / scale:.1f} ({s['median'] / scale:.1f}) {unit}"

    lines = ["| | memory build | eval | of which search | peak RSS | mIoU |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for row, r in rows.items():
        label = row_label(row)
        if "error" in r:
            lines.append(f"| {label} | failed: {r['error']} | | | | |")
            continue
        miou = (
            f"{r['miou_hungarian']:.4f} (Hungarian)"
            if "miou_hungarian" in r
            else f"{r['miou']:.4f}"
        )
        lines.append(f"| {label} | {span(r['build_seconds'])} | {span(r['eval_seconds'])} | "
                     f"{span(r['search_seconds'])} | {span(r['peak_rss_bytes'], 2**30, 'GiB')} | {miou} |")  # fmt: skip
    lines += ["", "| | bank (keys + values) | RSS before the build | peak over it | RSS growth over the build | "
              "RSS after ½ of the queries | after all |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row, r in rows.items():
        if "error" in r:
            continue
        label = row_label(row)
        (half, at_half), (every, at_all) = (
            r["rss_bytes_at_half_queries"],
            r["rss_bytes_at_all_queries"],
        )
        lines.append(f"| {label} | {r['bank_bytes'] / 2**20:.0f} MiB | {r['rss_bytes_before_build'] / 2**20:.0f} MiB | "
                     f"{r['working_bytes'] / 2**20:.0f} MiB | {r['build_growth_bytes'] / 2**20:.0f} MiB | "
                     f"{at_half / 2**20:.0f} MiB ({half}) | {at_all / 2**20:.0f} MiB ({every}) |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        work, index, result = args.child
        run_hbird(Path(work), index, Path(result))
        return
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    problem = peer_problem(args.peer)
    if problem:
        print(f"the peer cannot run: {problem}; running hbird alone", flush=True)
        rows = [r for r in rows if not r.startswith("peer:")]
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        set_threads(args.threads)
        write_inputs(work, args)
        for round_ in range(args.rounds):
            for row in rows if round_ % 2 == 0 else rows[::-1]:
                if row.startswith("peer:") and runs[row] and "error" in runs[row][-1]:
                    continue  # it failed once; it will fail again
                runs[row].append(run_row(row, work, args.peer))
                r = runs[row][-1]
                brief = r.get("error") or ", ".join(
                    f"{k.split('_')[0]} {r[k]:.1f} s" for k in ("build_seconds", "eval_seconds", "search_seconds"))  # fmt: skip
                print(f"round {round_ + 1} {row}: {brief}", flush=True)
    table = {row: summarise(r) for row, r in runs.items()}
    for row, r in table.items():
        if row.startswith("peer:") and "error" in r:
            print(f"the peer could not be run ({row}): {r['error']}; its row is left out")
    table = {row: r for row, r in table.items() if not (row.startswith("peer:") and "error" in r)}
    text = markdown(table)
    print(text)
    report = {"environment": environment(), "settings": settings(args), "rows": table, "runs": runs}
    write_report(report, args.out)
    args.out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
