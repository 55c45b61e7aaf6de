"""Benchmark FUNGI feature extraction under both presets, and how close ``fast`` is to ``paper``.

For each image size, each preset (``paper``: FUNGI Table 17 and the authors' code;
``fast``: hbird's older, cheaper views), each loss alone and all of them together, in
this process and on the same images, it measures

- throughput (images per second after a warm-up, best of ``--repeats`` runs) of
  ``FungiExtractor`` with its batched gradients (passes of many samples; the prefix up
  to the layer under no_grad; per-sample gradients by the closed form of a linear layer)
  and of two naive loops that handle one image at a time (all views of that image in one
  forward pass), on the same views and losses:
  ``naive``: frozen model, ``torch.autograd.grad`` w.r.t. the layer's parameters only
  (the strongest simple baseline; also the tests' oracle);
  ``naive_full_backward``: the model's parameters all trainable, ``loss.backward()`` and
  ``layer.weight.grad`` (what a straightforward implementation does);
- the floor no implementation can beat: the forward passes of all the views alone, under
  no_grad (``forward_only_floor``; ``batched_over_floor`` is the batched time over it;
  each naive loop's ``speedup_ceiling`` is its time over the floor, the largest speed-up
  any implementation could show against it on this machine);
- that all give the same features (largest absolute difference of the L2-normalised
  parts);
- peak memory: growth of the process RSS during each run (sampled every 2 ms; glibc is
  told to return freed memory at once so runs do not hide behind earlier peaks), and the
  CUDA peak when run on a GPU;
- ``fast_over_paper``: per loss set, the paper preset's batched time over the fast one's
  (how much of a speed-up is only less work).

With ``--cosines`` it also reports, per feature part, the cosine similarity between the
features of the paper preset and those of ``fast``, of the paper preset with one setting
set back to ``fast``'s, and of the paper preset with another crop seed or another draw of
negatives (the noise floor of the paper setting itself), all on the same images.

``--negatives`` sets the number of training images whose views form SimCLR's negative
batch (default: each preset's, 256 and 64; the fit is not timed).

With ``--text-cosines`` it reports the same cosines for texts (FUNGI Table 19 against
``fast``; KL and SimCLR): a BERT with random weights (``--text-width``, ``--text-blocks``)
over seeded random sentences of made-up words, one setting at a time set back to
``fast``'s, and the paper preset with other negative texts as the noise floor.

With ``--peer`` it instead times fungivision (the FUNGI authors' package, in its own
process: ``_fungivision_peer.py``, run by ``--peer-python``) against hbird rows on the
same work (timm ViT with the same random weights, the paper's views, the same heads,
projection, DINO crop boxes and 256 × 49 SimCLR negative embeddings), each row in its
own process, rows interleaved over ``--rounds``: seconds and CPU seconds per image (min,
median), images per second, peak RSS, the speed-up over fungivision, and each row's
feature cosines per part to hbird's default row. ``--rows`` lists ``peer`` and
``hbird[:KEY=VALUE...]`` rows (``FungiExtractor`` arguments, e.g. ``preset=paper_bf16``,
``batch_size=1``; ``separate_embedding=true`` adds the embedding's own forward,
``class_token_tail=false`` runs the ViT's whole last block). If
fungivision cannot be imported it says so and runs the hbird rows alone.

    python benchmarks/fungi.py --threads 1                 # test_vit at 224 and 64
    python benchmarks/fungi.py --peer --images 2 --batch-size 2 --threads 1 \
        --peer-python /tmp/fungivision-venv/bin/python    # docs/performance.md
    python benchmarks/fungi.py --image-sizes 64 --images 4 --repeats 1 --cosines
    python benchmarks/fungi.py --encoder vit_small_patch16_224 --image-sizes 224 --images 8
    python benchmarks/fungi.py --no-timing --image-sizes --text-cosines --threads 1

Writes JSON to ``benchmarks/results/fungi.json`` (``fungi_peer.json`` and ``.md`` with
``--peer``) unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import astuple
from pathlib import Path
from typing import Any

import torch
from _common import child_row, peak_rss_bytes, rss_bytes, write_report
from PIL import Image

from hbird.encoders import create_encoder
from hbird.encoders.precision import autocast_context
from hbird.fungi import PRESETS, FungiExtractor
from hbird.fungi.data import synthetic_classification
from hbird.fungi.gradients import PASS_ELEMENTS, flatten_linear_grads
from hbird.fungi.heads import RandomHead
from hbird.fungi.presets import FAST_NEGATIVE_INPUTS, preset_loss_options, preset_resize
from hbird.fungi.views import canvas_side, snap_to_patch
from hbird.io.images import load_image
from hbird.io.options import parse_pairs

DEFAULT_OUT = Path(__file__).parent / "results" / "fungi.json"
DEFAULT_PEER_OUT = Path(__file__).parent / "results" / "fungi_peer.json"
LOSSES = ("kl", "dino", "simclr")
PAPER_NEGATIVE_INPUTS = 256


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--encoder", help="encoder (random weights; default test_vit, with --peer ViT-S/16)"
    )
    parser.add_argument("--image-sizes", type=int, nargs="*", default=[224, 64])
    parser.add_argument("--images", type=int, default=32, help="images timed per run")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--negatives", type=int, help="SimCLR negative images (default: each preset's, 256 / 64)"
    )
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    parser.add_argument(
        "--cosines", action="store_true", help="also compare the presets' features (see above)"
    )
    parser.add_argument("--no-timing", action="store_true", help="only the --cosines part")
    parser.add_argument(
        "--text-cosines", action="store_true", help="compare the presets' text features too"
    )
    parser.add_argument("--texts", type=int, default=16, help="texts compared (--text-cosines)")
    parser.add_argument("--text-width", type=int, default=256, help="random BERT hidden size")
    parser.add_argument("--text-blocks", type=int, default=4, help="random BERT layers")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the fastest counts")
    parser.add_argument("--out", type=Path, default=None, help=f"default {DEFAULT_OUT}")
    peer = parser.add_argument_group("against fungivision (--peer)")
    peer.add_argument("--peer", action="store_true", help="time fungivision and hbird rows")
    peer.add_argument("--peer-python", default=sys.executable, help="a Python with fungivision")
    peer.add_argument("--peer-path", type=Path, help="put first on the peer's PYTHONPATH")
    peer.add_argument("--rows", default=PEER_ROWS, help="peer and hbird[:OPTION=VALUE...] rows")
    peer.add_argument("--rounds", type=int, default=2, help="interleaved rounds (min, median)")
    peer.add_argument(
        "--negative-images",
        type=int,
        default=2,
        help="images whose patches are tiled to the negatives",
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.encoder is None:
        args.encoder = "vit_small_patch16_224" if args.peer else "test_vit"
    if args.out is None:
        args.out = DEFAULT_PEER_OUT if args.peer else DEFAULT_OUT
    return args


def return_freed_memory_to_the_os() -> bool:
    """Make glibc serve big allocations with mmap (fixed threshold), so RSS falls when they
    are freed and the RSS growth of each run measures that run's own peak."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_mmap_threshold, m_trim_threshold = -3, -1
    return bool(libc.mallopt(m_mmap_threshold, 1 << 17)) and bool(
        libc.mallopt(m_trim_threshold, 1 << 17)
    )


@contextmanager
def peak_rss(result: dict[str, float], interval: float = 0.002) -> Iterator[None]:
    """Record in ``result["peak_rss_growth_mb"]`` the largest RSS growth while the block runs."""
    start = rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        peak[0] = max(peak[0], rss_bytes())
        result["peak_rss_growth_mb"] = (peak[0] - start) / 2**20


def timed(run: Callable[[], Any], device: torch.device) -> tuple[Any, dict[str, float]]:
    stats: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with peak_rss(stats):
        start = time.perf_counter()
        out = run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats["seconds"] = time.perf_counter() - start
    if device.type == "cuda":
        stats["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out, stats


def naive_loop(fx: FungiExtractor, images: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """One image at a time: its views, a forward pass and ``autograd.grad`` of the layer."""
    parts = [fx.extract_parts([image], gradients="naive") for image in images]
    return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


def naive_full_backward_loop(
    fx: FungiExtractor, images: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """One image at a time with a trainable model: ``loss.backward()``, then ``layer.weight.grad``."""
    backbone, layer, root = fx.backbone_, fx.layer_, fx.backbone_.root
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in fx.part_names}
    root.requires_grad_(True)
    try:
        for image in images:
            batch = backbone.prepare([image])
            with torch.no_grad():
                parts["embedding"].append(
                    fx._normalised(backbone.embed(backbone.input_view(batch)))
                )
            grads = []
            for loss in fx.losses_.values():
                root.zero_grad(set_to_none=True)
                groups = loss.make_views(batch)
                embeddings = [
                    backbone.embed(g.views).reshape(1, g.views_per_sample, -1) for g in groups
                ]
                loss(embeddings)[0].backward()
                grads.append(flatten_linear_grads(layer.weight.grad, layer.bias.grad)[None])
            for name, part in zip(fx.losses, fx.projection_(torch.cat(grads))):
                parts[name].append(fx._normalised(part[None]))
    finally:
        root.zero_grad(set_to_none=True)
        root.requires_grad_(False)
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def forward_floor(fx: FungiExtractor, images: list[torch.Tensor]) -> None:
    """The lower bound: the forward passes of every view, without autograd, nothing else."""
    backbone = fx.backbone_
    with torch.no_grad():
        for start in range(0, len(images), fx.batch_size):
            batch = backbone.prepare(images[start : start + fx.batch_size])
            if not any(loss.input_group is not None for loss in fx.losses_.values()):
                backbone.embed(backbone.input_view(batch))
            for loss in fx.losses_.values():
                for group in loss.make_views(batch):
                    step = max(1, PASS_ELEMENTS // group.views[0].numel())
                    for first in range(0, group.views.shape[0], step):
                        backbone.embed(group.views[first : first + step])


def best_of(
    repeats: int, run: Callable[[], Any], device: torch.device
) -> tuple[Any, dict[str, float]]:
    """The output and stats of the fastest of ``repeats`` runs (the peak RSS of the largest)."""
    best_out, best = None, None
    peak = 0.0
    for _ in range(repeats):
        out, stats = timed(run, device)
        peak = max(peak, stats["peak_rss_growth_mb"])
        if best is None or stats["seconds"] < best["seconds"]:
            best_out, best = out, stats
    return best_out, {**best, "peak_rss_growth_mb": peak, "repeats": repeats}


def measure(
    fx: FungiExtractor, images: list[torch.Tensor], device: torch.device, repeats: int
) -> dict[str, Any]:
    fx.extract_parts(images[: fx.batch_size])  # warm-up (also fills the projection cache)
    naive_loop(fx, images[:1])
    batched, batched_stats = best_of(repeats, lambda: fx.extract_parts(images), device)
    n = len(images)
    _, floor_stats = best_of(repeats, lambda: forward_floor(fx, images), device)
    out: dict[str, Any] = {
        "batched": {"images_per_second": n / batched_stats["seconds"], **batched_stats},
        "forward_only_floor": {
            "images_per_second": n / floor_stats["seconds"],
            **floor_stats,
            "batched_over_floor": batched_stats["seconds"] / floor_stats["seconds"],
        },
    }
    for key, loop in (("naive", naive_loop), ("naive_full_backward", naive_full_backward_loop)):
        features, stats = best_of(repeats, lambda loop=loop: loop(fx, images), device)
        out[key] = {
            "images_per_second": n / stats["seconds"],
            **stats,
            "batched_speedup": stats["seconds"] / batched_stats["seconds"],
            "speedup_ceiling": stats["seconds"] / floor_stats["seconds"],
            "max_abs_feature_difference": max(
                float((batched[name] - features[name]).abs().max()) for name in batched
            ),
        }
    return out


def cosines(parts: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Per part: mean and min over images of the cosine of two L2-normalised features."""
    out = {}
    for name, ref in reference.items():
        cos = (parts[name].double() * ref.double()).sum(dim=1)
        out[name] = {"mean": float(cos.mean()), "min": float(cos.min())}
    return out


def preset_cosines(
    encoder: Any, train: list[torch.Tensor], images: list[torch.Tensor], size: int, args: Any
) -> dict[str, Any]:
    """Cosines to the paper preset's features of ``fast``, of one setting at a time set back
    to ``fast``'s, and of the paper preset with other random draws (the noise floor).

    Every variant uses the first training images as negatives (``negatives=``); variants
    whose SimCLR views are the paper's reuse the paper's negative embeddings."""
    negatives = args.negatives or PAPER_NEGATIVE_INPUTS
    fast_negatives = args.negatives or FAST_NEGATIVE_INPUTS
    base = dict(seed=args.seed, batch_size=args.batch_size, image_size=size)
    paper = FungiExtractor(encoder, negatives=train[:negatives], **base).fit(train)
    reference = paper.extract_parts(images)
    embedded = paper.losses_["simclr"].negatives  # (negatives · V, D), input after input
    views = paper.losses_["simclr"].views.num_patches
    fast = preset_loss_options("fast", paper.backbone_)
    local = snap_to_patch(size * 96 / 224, paper.backbone_.patch_size)
    variants: dict[str, dict[str, Any]] = {
        "fast": dict(preset="fast", negatives=train[:fast_negatives]),
        "paper, short-side canvas": dict(resize="short-side", negatives=train[:negatives]),
        "paper, DINO local crops 96/224": dict(loss_options={"dino": {"local_size": local}}),
        "paper, DINO boxes shared, bilinear": dict(
            loss_options={"dino": {"boxes": "shared", "interpolation": "bilinear"}}
        ),
        "paper, SimCLR patches at their size, spread": dict(
            loss_options={"simclr": {k: fast["simclr"][k] for k in ("view_size", "grid")}},
            negatives=train[:negatives],
        ),
        f"paper, {fast_negatives} SimCLR negatives": dict(
            negatives=embedded[: fast_negatives * views]
        ),
        "paper, another crop seed (noise floor)": dict(
            loss_options={"dino": {"crop_seed": args.seed + 1}}
        ),
        "paper, other negative images (noise floor)": dict(
            negatives=train[negatives : 2 * negatives]
        ),
    }
    out = {}
    for name, options in variants.items():
        if name.endswith(" SimCLR negatives") and fast_negatives == negatives:
            continue
        options.setdefault("negatives", embedded)
        fx = FungiExtractor(encoder, **base, **options).fit(train)
        out[name] = cosines(fx.extract_parts(images), reference)
        row = "  ".join(f"{k} {v['mean']:.4f}" for k, v in out[name].items())
        print(f"{size:>4}px cosine to paper | {name:<46} {row}", flush=True)
    return out


def random_text_backbone(width: int, blocks: int, seed: int, words: int = 400) -> Any:
    """A BERT with seeded random weights over a vocabulary of made-up words ``w0 w1 ...``."""
    import tempfile

    import transformers

    from hbird.fungi import TextBackbone

    with tempfile.TemporaryDirectory() as folder:
        vocab = Path(folder) / "vocab.txt"
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab.write_text("\n".join([*special, *(f"w{i}" for i in range(words))]) + "\n")
        tokenizer = transformers.BertTokenizer(str(vocab))
    config = transformers.BertConfig(
        vocab_size=5 + words,
        hidden_size=width,
        num_hidden_layers=blocks,
        num_attention_heads=max(1, width // 64),
        intermediate_size=4 * width,
    )
    torch.manual_seed(seed)
    return TextBackbone(transformers.BertModel(config), tokenizer, name="random-bert")


def synthetic_texts(n: int, seed: int, words: int = 400) -> list[str]:
    """``n`` seeded sentences of 6 to 20 made-up words (Zipf-like word frequencies)."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, words + 1, dtype=torch.float64)
    lengths = torch.randint(6, 21, (n,), generator=gen)
    return [
        " ".join(f"w{int(i)}" for i in torch.multinomial(weights, int(m), True, generator=gen))
        for m in lengths
    ]


def text_preset_cosines(args: Any) -> dict[str, Any]:
    """Cosines to the paper preset's text features (Table 19) of ``fast`` and of one
    SimCLR setting at a time set back to ``fast``'s, with the noise floor of other
    negative texts; every variant's negatives are the first training texts."""
    backbone = random_text_backbone(args.text_width, args.text_blocks, args.seed)
    negatives = args.negatives or PAPER_NEGATIVE_INPUTS
    fast_negatives = args.negatives or FAST_NEGATIVE_INPUTS
    train = synthetic_texts(2 * negatives, args.seed)
    texts = synthetic_texts(args.texts, args.seed + 1)
    base = dict(losses=("kl", "simclr"), seed=args.seed, batch_size=args.batch_size)
    reference = (
        FungiExtractor(backbone, negatives=train[:negatives], **base)
        .fit(train)
        .extract_parts(texts)
    )
    fast = preset_loss_options("fast", backbone)["simclr"]
    other_head = RandomHead(backbone.embed_dim, 256, args.seed + 1, "simclr")  # Table 19: 256
    variants: dict[str, dict[str, Any]] = {
        "fast": dict(preset="fast", negatives=train[:fast_negatives]),
        **{
            f"paper, SimCLR {key} {fast[key]}": dict(loss_options={"simclr": {key: fast[key]}})
            for key in ("text_views", "text_negative_views", "head_dim")
        },
        f"paper, {fast_negatives} negative texts": dict(negatives=train[:fast_negatives]),
        "paper, other negative texts (noise floor)": dict(negatives=train[negatives:]),
        "paper, another SimCLR head draw (noise floor)": dict(
            heads={"simclr": (other_head.weight, other_head.bias)}
        ),
    }
    out = {}
    for name, options in variants.items():
        if name.endswith(" negative texts") and fast_negatives == negatives:
            continue
        options.setdefault("negatives", train[:negatives])
        fx = FungiExtractor(backbone, **base, **options).fit(train)
        out[name] = cosines(fx.extract_parts(texts), reference)
        row = "  ".join(f"{k} {v['mean']:.4f}" for k, v in out[name].items())
        print(f"text cosine to paper | {name:<46} {row}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        work, row, out = args.child
        run_hbird_row(Path(work), row, Path(out))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peer:
        args.negatives = args.negatives or PAPER_NEGATIVE_INPUTS
        report = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                              "load_average_at_start": os.getloadavg()},
                  **against_peer(args)}  # fmt: skip
        write_report(report, args.out)
        args.out.with_suffix(".md").write_text(report["markdown"] + "\n")
        return report
    rss_is_exact = return_freed_memory_to_the_os()
    device = torch.device(args.device)
    encoder = create_encoder(args.encoder, device=device)
    results: dict[str, Any] = {}
    loss_sets = [(name,) for name in LOSSES] + [LOSSES]
    for size in args.image_sizes:
        most = args.negatives or PAPER_NEGATIVE_INPUTS
        count = max(args.images, 2 * most if args.cosines else most)
        data = synthetic_classification(count, seed=args.seed, size=size)
        images = list(data.images[: args.images])
        options = (
            {} if args.negatives is None else {"simclr": {"num_negative_inputs": args.negatives}}
        )
        by_size = results[str(size)] = {}
        for preset in [] if args.no_timing else args.presets:
            by_size[preset] = {}
            for losses in loss_sets:
                key = "+".join(losses)
                fx = FungiExtractor(
                    encoder,
                    losses=losses,
                    seed=args.seed,
                    preset=preset,
                    batch_size=args.batch_size,
                    image_size=size,
                    loss_options=options,
                ).fit(data.images)
                row = by_size[preset][key] = measure(fx, images, device, args.repeats)
                row["loss_settings"] = {name: loss.settings for name, loss in fx.losses_.items()}
                print(
                    f"{size:>4}px {preset:<5} {key:<15} batched {row['batched']['images_per_second']:8.2f} img/s | "
                    f"floor {row['forward_only_floor']['images_per_second']:8.2f} img/s | "
                    f"naive {row['naive']['images_per_second']:7.2f} img/s ({row['naive']['batched_speedup']:4.2f}x) | "
                    f"naive full backward {row['naive_full_backward']['images_per_second']:7.2f} img/s "
                    f"({row['naive_full_backward']['batched_speedup']:4.2f}x) | "
                    f"max |diff| {max(row[k]['max_abs_feature_difference'] for k in ('naive', 'naive_full_backward')):.1e} | "
                    f"peak RSS +{row['batched']['peak_rss_growth_mb']:.0f} / "
                    f"+{row['naive']['peak_rss_growth_mb']:.0f} / +{row['naive_full_backward']['peak_rss_growth_mb']:.0f} MB",
                    flush=True,
                )
        if {"paper", "fast"} <= set(by_size):
            by_size["fast_over_paper"] = {
                "+".join(losses): {
                    key: by_size["paper"]["+".join(losses)][key]["seconds"]
                    / by_size["fast"]["+".join(losses)][key]["seconds"]
                    for key in ("batched", "naive", "forward_only_floor")
                }
                for losses in loss_sets
            }
            for key, ratio in by_size["fast_over_paper"].items():
                print(
                    f"{size:>4}px {key:<15} paper time / fast time: batched {ratio['batched']:.2f}x"
                )
        if args.cosines:
            by_size["cosine_to_paper"] = preset_cosines(
                encoder, list(data.images), images, size, args
            )
    if args.text_cosines:
        results["text"] = {"cosine_to_paper": text_preset_cosines(args)}
    report = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "encoder": encoder.identity(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "rss_growth_is_per_run": rss_is_exact,
        },
        "results": results,
    }
    write_report(report, args.out)
    return report


# -- against fungivision (--peer) ----------------------------------------------------------

PEER_CHILD = Path(__file__).with_name("_fungivision_peer.py")
PEER_ROWS = "peer,hbird,hbird:autocast=bf16"
PEER_INSTALL = (
    "python -m venv --system-site-packages /tmp/fungivision-venv && "
    "/tmp/fungivision-venv/bin/pip install --no-deps fungivision, then "
    "--peer-python /tmp/fungivision-venv/bin/python (or pip install --no-deps --target DIR "
    "fungivision and --peer-path DIR)"
)


def peer_env(args: argparse.Namespace) -> dict[str, str]:
    """The peer child's environment: ours, with ``--peer-path`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    if args.peer_path:
        env["PYTHONPATH"] = os.pathsep.join(
            [str(args.peer_path), *filter(None, [env.get("PYTHONPATH")])]
        )
    return env


def peer_problem(args: argparse.Namespace) -> str | None:
    """Why fungivision cannot run with ``--peer-python`` (None if it imports)."""
    probe = [args.peer_python, "-c", "import fungivision.wrapper"]
    done = subprocess.run(probe, env=peer_env(args), capture_output=True, text=True)
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return f"{args.peer_python} cannot import fungivision ({last}); install it with {PEER_INSTALL}"


def write_peer_inputs(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Images (8-bit PNGs at the canvas side, so neither side resizes them before its
    views), the random weights, and what both sides are given: heads, projection, DINO
    crop boxes and the SimCLR negative embeddings (``given.pt``)."""
    size = args.image_sizes[0]
    torch.manual_seed(args.seed)  # the same random weights for every row
    encoder = create_encoder(args.encoder)
    torch.save(encoder.model.state_dict(), work / "model.pt")
    canvas = canvas_side(snap_to_patch(size, encoder.patch_size), preset_resize("paper"))
    data = synthetic_classification(args.images + args.negative_images, args.seed, size=canvas)
    names = []
    for i, image in enumerate(data.images):
        names.append(f"image_{i:03d}.png")
        pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        Image.fromarray(pixels).save(work / names[-1])
    images = [load_image(work / n) for n in names]
    fx = FungiExtractor(
        encoder, seed=args.seed, image_size=size, negatives=torch.zeros(1, encoder.embed_dim)
    )
    fx._build()
    simclr, dino = fx.losses_["simclr"], fx.losses_["dino"]
    with torch.no_grad(), autocast_context(torch.device("cpu"), torch.bfloat16):  # inputs only
        views = simclr.make_negative_views(fx.backbone_.prepare(images[args.images :]))[0].views
        embedded = torch.cat([fx.backbone_.embed(v) for v in views.split(16)]).float()
    rows = args.negatives * simclr.views.num_patches  # the paper's 256 × 49 negative views
    negatives = embedded.repeat(-(-rows // len(embedded)), 1)[:rows]  # whole images, tiled
    heads = {
        f"{name}.{head}" if len(loss.head_names) > 1 else name: getattr(loss, head)
        for name, loss in fx.losses_.items()
        for head in loss.head_names
    }
    given = {f"{key}.{p}": getattr(h, p) for key, h in heads.items() for p in ("weight", "bias")}
    given["projection"] = fx.projection_.matrix().to(torch.int8)  # (d, m) ±1
    given["negatives"] = negatives
    torch.save(given, work / "given.pt")
    boxes = [
        [list(astuple(b)) for b in dino.crops.boxes_for(fx.backbone_.prepare([x])[0])]
        for x in images[: args.images]
    ]
    settings = {name: loss.settings for name, loss in fx.losses_.items()}
    setup = {
        "timm_model": args.encoder,
        "image_size": size,
        "images": names[: args.images],
        "negative_inputs": args.negatives,
        "batch_size": args.batch_size,
        "threads": args.threads or 1,
        "seed": args.seed,
        "losses": list(LOSSES),
        "layer": fx.layer_name_,
        "mean": list(encoder.mean),
        "std": list(encoder.std),
        "head_dims": {name: s["head_dim"] for name, s in settings.items()},
        "temperatures": {
            "kl": settings["kl"]["temperature"],
            "dino_teacher": settings["dino"]["teacher_temperature"],
            "dino_student": settings["dino"]["student_temperature"],
            "simclr": settings["simclr"]["temperature"],
        },
        "boxes": boxes,
    }
    (work / "setup.json").write_text(json.dumps(setup))
    return setup


def run_hbird_row(work: Path, row: str, out: Path) -> None:
    """Child process: hbird's FUNGI on the images in ``work``, with ``row``'s options."""
    setup = json.loads((work / "setup.json").read_text())
    torch.set_num_threads(setup["threads"])
    encoder = create_encoder(setup["timm_model"])
    encoder.model.load_state_dict(torch.load(work / "model.pt"))
    options = parse_pairs(row.split(":")[1:], "an hbird row", "autocast=bf16")
    separate_embedding = options.pop("separate_embedding", False)  # the KL-reuse lever, off
    class_token_tail = options.pop("class_token_tail", True)  # hbird.fungi.class_token
    given = torch.load(work / "given.pt")
    images = [load_image(work / p) for p in setup["images"]]
    fx = FungiExtractor(
        encoder,
        losses=setup["losses"],
        seed=setup["seed"],
        image_size=setup["image_size"],
        batch_size=options.pop("batch_size", setup["batch_size"]),
        negatives=given["negatives"],
        **options,
    ).fit(images[:1])
    fx.backbone_.class_token_tail = class_token_tail
    with torch.no_grad():  # warm-up, as the peer's child
        fx.backbone_.embed(fx.backbone_.input_view(fx.backbone_.prepare(images[:1])))
    start, cpu_start = time.perf_counter(), time.process_time()
    parts = fx.extract_parts(images)
    if separate_embedding:  # what not reusing the KL view's forward for the embedding costs
        with torch.no_grad(), autocast_context(fx.backbone_.device, fx.autocast_dtype_):
            for first in range(0, len(images), fx.batch_size):
                batch = fx.backbone_.prepare(images[first : first + fx.batch_size])
                fx.backbone_.embed(fx.backbone_.input_view(batch))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save(parts, out)
    row_out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "images": len(images),
               "peak_rss_bytes": peak_rss_bytes()}  # fmt: skip
    print(json.dumps(row_out))


def run_peer_row(work: Path, row: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One row in its own process (``out``: where its features go); its JSON row."""
    setup = json.loads((work / "setup.json").read_text())
    if row == "peer":
        (work / "setup.json").write_text(json.dumps({**setup, "features_out": out.name}))
        argv, env = [args.peer_python, str(PEER_CHILD), str(work)], peer_env(args)
    else:
        argv, env = [sys.executable, __file__, "--child", str(work), row, str(out)], None
    start = time.perf_counter()
    result = child_row(argv, env)
    return {**result, "process_seconds": time.perf_counter() - start}


def part_cosines(parts: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """Per part: mean and min cosine, and the largest absolute difference."""
    out = cosines(parts, reference)
    for name, ref in reference.items():
        out[name]["max_abs_difference"] = float((parts[name] - ref).abs().max())
    return out


def summarise_rows(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Min and median seconds per image, images per second, peak RSS, per row."""
    table: dict[str, dict[str, Any]] = {}
    for row, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            table[row] = {"error": results[-1]["error"]}
            continue
        table[row] = {"rounds": len(ok)}
        for key in ("seconds", "cpu_seconds"):
            per_image = [r[key] / r["images"] for r in ok]
            table[row][f"{key}_per_image"] = {
                "min": min(per_image),
                "median": statistics.median(per_image),
            }
        table[row]["images_per_second"] = 1.0 / table[row]["seconds_per_image"]["min"]
        table[row]["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
        if "stage_seconds" in ok[-1]:
            table[row]["stage_seconds"] = ok[-1]["stage_seconds"]
    if "peer" in table and "error" not in table["peer"]:
        peer = table["peer"]
        for row in table.values():
            for key in ("seconds", "cpu_seconds") if "error" not in row else ():
                row[f"speedup_over_peer_{key}"] = {
                    k: peer[f"{key}_per_image"][k] / row[f"{key}_per_image"][k]
                    for k in ("min", "median")
                }
    return table


def peer_markdown(table: dict[str, dict[str, Any]], cos: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| row | s / image | CPU s / image | images / s | × fungivision | × fungivision, CPU "
        "| peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]

    def span(s: dict[str, float] | None) -> str:
        return f"{s['min']:.2f} ({s['median']:.2f})" if s else "–"

    for row, r in table.items():
        if "error" in r:
            lines.append(f"| {row} | failed: {r['error']} | | | | | |")
            continue
        lines.append(
            f"| {row} | {span(r['seconds_per_image'])} | {span(r['cpu_seconds_per_image'])} | "
            f"{r['images_per_second']:.3f} | {span(r.get('speedup_over_peer_seconds'))} | "
            f"{span(r.get('speedup_over_peer_cpu_seconds'))} | "
            f"{r['peak_rss_bytes'] / 2**20:.0f} MiB |"
        )
    if cos:
        parts = list(next(iter(cos.values())))
        lines += ["", "| features | " + " | ".join(parts) + " |", "|---" * (len(parts) + 1) + "|"]
        for name, c in cos.items():
            cells = [f"{c[p]['mean']:.5f} ({c[p]['min']:.5f})" for p in parts]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def against_peer(args: argparse.Namespace) -> dict[str, Any]:
    """fungivision and hbird rows on the same work, each in its own process, interleaved."""
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    problem = peer_problem(args) if "peer" in rows else None
    if problem:
        print(f"the peer cannot run: {problem}; running hbird alone", flush=True)
        rows = [r for r in rows if r != "peer"]
    runs: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    cos: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        setup = write_peer_inputs(work, args)
        outs = {row: work / f"features_{i}.pt" for i, row in enumerate(rows)}
        for round_ in range(args.rounds):
            for row in rows if round_ % 2 == 0 else rows[::-1]:
                if runs[row] and "error" in runs[row][-1]:
                    continue  # it failed once; it will fail again
                runs[row].append(run_peer_row(work, row, args, outs[row]))
                r = runs[row][-1]
                brief = r.get("error") or (
                    f"{r['seconds'] / r['images']:.2f} s / image, "
                    f"{r['cpu_seconds'] / r['images']:.2f} CPU s / image"
                )
                print(f"round {round_ + 1} {row}: {brief}", flush=True)
        features = {row: torch.load(p) for row, p in outs.items() if p.exists()}
        if "hbird" in features:
            reference = features["hbird"]
            for row, parts in features.items():
                if row != "hbird":
                    cos[f"{row} vs hbird"] = part_cosines(parts, reference)
    table = summarise_rows(runs)
    text = peer_markdown(table, cos)
    print(text)
    return {"setup": {k: v for k, v in setup.items() if k != "boxes"}, "rows": table,
            "cosines": cos, "runs": runs, "markdown": text}  # fmt: skip


if __name__ == "__main__":
    main()
