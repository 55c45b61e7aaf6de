"""Arguments shared by several subcommands, and turning them into library objects."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hbird.io.options import parse_pairs
from hbird.predictor import InContextPredictor


def parse_layers(text: str | None) -> int | tuple[int, ...] | None:
    """``"-1"`` → -1; ``"8,9,10"`` → (8, 9, 10); None → None (last block)."""
    if text is None:
        return None
    items = [int(t) for t in text.split(",") if t.strip()]
    return items[0] if len(items) == 1 else tuple(items)


DEFAULT_ENCODER = "vit_small_patch14_dinov2.lvd142m"


AUTOCAST_HELP = (
    "run the encoder under autocast: about 2x faster on a GPU, features change slightly "
    "(default float32; with --bank: the bank's)"
)


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("encoder")
    group.add_argument(
        "--encoder",
        help=f"registry name: any timm ViT, hf:<id or dir>, test_vit... (default {DEFAULT_ENCODER}; "
        "with --bank: the bank's encoder)",
    )
    group.add_argument("--weights", help="local checkpoint (.safetensors or .pth) for the encoder")
    group.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the encoder's published weights when no --weights is given (downloads once; default on)",
    )
    group.add_argument(
        "--layers", help="block index or comma-separated indices (default: last block)"
    )
    group.add_argument(
        "--image-size", type=int, default=224, help="short side the encoder sees (default 224)"
    )
    group.add_argument("--batch-size", type=int, default=16, help="images per encoder forward")
    group.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1...)")
    group.add_argument("--autocast", choices=["bf16", "fp16"], help=AUTOCAST_HELP)


def add_memory_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory and retrieval")
    group.add_argument(
        "--k", type=int, help="neighbours per query patch (default 30; with --bank: the bank's)"
    )
    group.add_argument(
        "--temperature",
        type=float,
        help="softmax temperature β (default 0.02; with --bank: the bank's)",
    )
    group.add_argument(
        "--memory-size", type=int, help="total memory budget |M| (default: keep every patch)"
    )
    group.add_argument(
        "--aug-epochs", type=int, default=1, help="passes over the prompt; extra ones augmented"
    )
    group.add_argument(
        "--index",
        choices=["auto", "exact", "flat", "ivfpq", "hnsw", "scann"],
        help="search backend (default auto; with --bank: the bank's)",
    )
    group.add_argument(
        "--index-param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="index backend option, repeatable (e.g. k_factor=16 nprobe=16 for ivfpq)",
    )
    group.add_argument("--seed", type=int, default=0, help="seed for augmentation and sampling")
    group.add_argument(
        "--features",
        choices=["patch", "fungi"],
        default="patch",
        help="patch features (default) or dense FUNGI (patch + projected SimCLR gradient)",
    )


def add_label_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("labels")
    group.add_argument(
        "--task",
        choices=["segmentation", "depth"],
        help="default: from the label folder (masks/ or depth/)",
    )
    group.add_argument(
        "--num-classes", type=int, help="number of classes (default: from classes.txt)"
    )
    group.add_argument(
        "--ignore-index", type=int, default=255, help="class id of unlabelled pixels (default 255)"
    )


def explicit_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Settings a bank records that were given on the command line; the others keep the
    predictor's defaults, or a loaded bank's values."""
    given = {
        "k": args.k,
        "temperature": args.temperature,
        "index": args.index,
        "autocast": args.autocast,
    }
    return {name: value for name, value in given.items() if value is not None}


def parse_index_params(items: list[str]) -> dict[str, Any]:
    """``["k_factor=16"]`` → ``{"k_factor": 16}`` (see :mod:`hbird.io.options`)."""
    return parse_pairs(items, "--index-param", "k_factor=16")


def predictor_from_args(args: argparse.Namespace) -> InContextPredictor:
    return InContextPredictor(
        encoder=args.encoder or DEFAULT_ENCODER,
        weights=args.weights,
        pretrained=args.pretrained,
        layers=parse_layers(args.layers),
        image_size=args.image_size,
        memory_size=args.memory_size,
        aug_epochs=args.aug_epochs,
        **explicit_settings(args),
        index_params=parse_index_params(args.index_param),
        batch_size=args.batch_size,
        device=args.device,
        seed=args.seed,
        features=args.features,
        progress=not getattr(args, "quiet", False),
    )


def prompt_dataset(args: argparse.Namespace, root: str | Path) -> Any:
    """The user's prompt folder (``images/`` + ``masks/`` or ``depth/``) as a dataset."""
    from hbird.data.folder import FolderDataset

    return FolderDataset(
        root, task=args.task, num_classes=args.num_classes, ignore_index=args.ignore_index
    )
