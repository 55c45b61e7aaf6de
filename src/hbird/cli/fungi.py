"""``hbird fungi knn``: kNN accuracy of embeddings alone and with FUNGI gradients added.

    hbird fungi knn --encoder vit_small_patch14_dinov2.lvd142m \\
        --dataset folder:root=/data/pets --losses kl,dino,simclr

prints the paper's Table 2 layout (full data and k-shot, majority and softmax votes) and
writes the rows as JSON with ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hbird.errors import InputError
from hbird.io.files import check_output, write_json
from hbird.io.options import parse_pairs
from hbird.specs import DEFAULT_ENCODER

SETTING_FLAGS = {"loss_options": "--loss-option"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="fungi_command", metavar="ACTION", required=True)
    knn = sub.add_parser(
        "knn",
        help="kNN classification with embeddings and with FUNGI features",
        description="kNN accuracy for the embeddings alone and with each gradient added "
        "(full data and k-shot; majority and softmax-weighted votes).",
    )
    data = knn.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="folder:root=<dir with <split>/<class>/images> or synthetic:train=N:val=M[:classes=C:size=S:seed=S]; "
        "with --modality audio: folder:root=<dir with <split>/<class>/*.wav>, esc50:root=<ESC-50>[:fold=5] "
        "(splits train, test), speechcommands:root=<dir> (splits train, val, test) or "
        "synthetic:train=N:val=M[:classes=C:rate=HZ:seconds=S:seed=S]",
    )
    data.add_argument(
        "--modality",
        choices=["image", "audio"],
        default="image",
        help="image (an hbird encoder) or audio (an Audio Spectrogram Transformer, FUNGI A.2)",
    )
    data.add_argument("--train-split", default="train", help="split the kNN memory comes from")
    data.add_argument("--test-split", default="val", help="split that is classified")
    model = knn.add_argument_group("model")
    model.add_argument(
        "--encoder",
        help=f"encoder name (default {DEFAULT_ENCODER}; audio: ast, which needs --weights, or "
        "test_ast, a tiny random AST)",
    )
    model.add_argument(
        "--weights",
        help="local checkpoint for the encoder (audio: a folder saved by ASTModel.save_pretrained)",
    )
    model.add_argument(
        "--pretrained",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="use the encoder's published weights when no --weights is given (test_* encoders: never)",
    )
    model.add_argument("--device", default="cpu", help="torch device")
    model.add_argument(
        "--image-size", type=int, default=224, help="square input side (default 224)"
    )
    model.add_argument("--batch-size", type=int, default=16, help="images per gradient batch")
    model.add_argument("--autocast", choices=["bf16", "fp16"], help="run the model under autocast")
    fungi = knn.add_argument_group("FUNGI")
    fungi.add_argument(
        "--losses", default="kl,dino,simclr", help="comma-separated losses, in order"
    )
    fungi.add_argument(
        "--preset",
        choices=["paper", "paper_bf16", "fast"],
        default="paper",
        help="loss settings: paper (FUNGI Table 17 and the authors' code, default), "
        "paper_bf16 (the same with the model under bf16 autocast: ~2x faster on CPUs with "
        "bf16 units, features within bf16 rounding) or fast (96-pixel local crops shared by "
        "all images, 112-pixel SimCLR patches, 64 negative images; hbird's older defaults); "
        "--loss-option overrides any",
    )
    fungi.add_argument(
        "--layer", help="gradient layer path (default: last attention output projection)"
    )
    fungi.add_argument(
        "--loss-option",
        action="append",
        default=[],
        metavar="LOSS.KEY=VALUE",
        help="override a loss setting, e.g. simclr.num_negative_inputs=16 (repeatable)",
    )
    fungi.add_argument("--pca-dim", type=int, help="PCA dimension fitted on the training features")
    fungi.add_argument(
        "--seed", type=int, default=0, help="seed of heads, views, projection, k-shot"
    )
    evaluation = knn.add_argument_group("evaluation")
    evaluation.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    evaluation.add_argument(
        "--shots", type=int, default=5, help="k-shot size per class; 0 = full only"
    )
    evaluation.add_argument("--retrieval", action="store_true", help="also report retrieval mAP")
    evaluation.add_argument("--out", type=Path, help="write the rows and settings as JSON here")
    evaluation.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_loss_options(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["simclr.num_negative_inputs=16"]`` → ``{"simclr": {"num_negative_inputs": 16}}``."""
    options: dict[str, dict[str, Any]] = {}
    for key, value in parse_pairs(items, "--loss-option", "dino.num_local=4").items():
        loss, dot, name = key.partition(".")
        if not dot or not loss.strip() or not name.strip():
            raise InputError(
                f"--loss-option {key}=... must look like LOSS.KEY=VALUE, e.g. dino.num_local=4"
            )
        options.setdefault(loss.strip(), {})[name.strip()] = value
    return options


def class_warnings(labels: Any, class_names: Sequence[str], shots: int) -> list[str]:
    """What a user should know about the training split before the kNN table: one class
    (every prediction is right by construction) and ``--shots`` larger than a class."""
    counts = {int(c): int(n) for c, n in zip(*labels.unique(return_counts=True))}
    lines = []
    if len(counts) < 2:
        name = class_names[next(iter(counts))] if counts else "none"
        lines.append(
            f"the training split holds one class ({name}): kNN can only predict it, so the "
            "accuracies say nothing about the features; give images of two or more classes"
        )
    short = {class_names[c]: n for c, n in counts.items() if n < shots}
    if short:
        used = sum(min(n, shots) for n in counts.values())
        listed = ", ".join(f"{name} {n}" for name, n in sorted(short.items()))
        lines.append(
            f"--shots {shots}: {len(short)} class(es) have fewer training images ({listed}); "
            f"the {shots}-shot rows use all of those, {used} images in all"
        )
    return lines


def run(args: argparse.Namespace) -> int:
    if args.fungi_command != "knn":
        raise InputError(f"unknown fungi action {args.fungi_command!r}")
    from hbird.encoders import create_encoder
    from hbird.fungi import FungiExtractor
    from hbird.fungi.data import load_classification
    from hbird.fungi.evaluate import cumulative_feature_sets, format_table, knn_table

    if args.out is not None:
        check_output(args.out, "--out", kind="file")
    losses = [name.strip() for name in args.losses.split(",") if name.strip()]
    train = load_classification(args.dataset, args.train_split, args.modality)
    test = load_classification(args.dataset, args.test_split, args.modality)
    for line in class_warnings(train.labels, train.class_names, args.shots):
        print(f"hbird fungi knn: warning: {line}", file=sys.stderr)
    if args.modality == "audio":
        from hbird.fungi.audio import create_audio_backbone

        encoder = create_audio_backbone(args.encoder or "ast", args.weights, args.device)
    else:
        name = args.encoder or DEFAULT_ENCODER
        encoder = create_encoder(
            name,
            weights=args.weights,
            pretrained=args.pretrained and args.weights is None and not name.startswith("test_"),
            device=args.device,
        )
    extractor = FungiExtractor(
        encoder,
        losses=losses,
        layer=args.layer,
        seed=args.seed,
        preset=args.preset,
        batch_size=args.batch_size,
        image_size=args.image_size,
        loss_options=parse_loss_options(args.loss_option),
        autocast=args.autocast,
        progress=not args.quiet,
    )
    start = time.perf_counter()
    extractor.fit(train.inputs)
    train_parts = extractor.extract_parts(train.inputs)
    test_parts = extractor.extract_parts(test.inputs)
    seconds = time.perf_counter() - start
    rows = knn_table(
        train_parts,
        train.labels,
        test_parts,
        test.labels,
        cumulative_feature_sets(losses),
        k=args.k,
        shots=args.shots or None,
        pca_dim=args.pca_dim,
        seed=args.seed,
        retrieval=args.retrieval,
        device=args.device,
    )
    print(
        f"{encoder.name} on {args.dataset}: {len(train)} train / {len(test)} test "
        f"{'clips' if args.modality == 'audio' else 'images'}, "
        f"{len(train.class_names)} classes, gradients of {extractor.layer_name_}, k={args.k}"
    )
    print(format_table(rows))
    if args.out is not None:
        write_json(
            args.out,
            {
                "dataset": args.dataset,
                "encoder": encoder.identity(),
                "layer": extractor.layer_name_,
                "preset": args.preset,
                "losses": {name: loss.settings for name, loss in extractor.losses_.items()},
                "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
                "feature_seconds": seconds,
                "rows": rows,
            },
        )
    return 0
