"""``hbird zeroshot index|build|predict|plus``: zero-shot segmentation by retrieve and
co-segment (ReCo, issue 11): index an unlabelled folder with CLIP, build a reference per
named class, predict class ids for new images, train a ReCo+ student on ReCo's
pseudo-labels (:mod:`hbird.zeroshot.plus`). Score with ``hbird eval --protocol reco``."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hbird.errors import InputError

SETTING_FLAGS = {
    "k": "--k",
    "overwrite": "--overwrite",
    "clip": "--clip",
    "dense_clip": "--dense-clip",
}


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


SETTING_HELP = {
    "k": "archive size: images retrieved per class",
    "image_size": "side the archive images are resized and centre-cropped to",
    "n_seeds": "seed pixels per archive image (1-5 are best)",
    "contexts": "context classes, a comma list ('' for none)",
    "context_temperature": "τ_ctx of context elimination",
    "context_elimination": "context elimination",
    "language_guidance": "language-guided co-segmentation (needs --dense-clip)",
    "dense_inference": "the DenseCLIP factor at prediction (needs --dense-clip)",
    "language_scale": "the 10 in σ(10 ⟨DenseCLIP, t_c⟩)",
    "official_grid": "Algorithm 1's column slice (the max for image i runs over images i..2i)",
    "chunk_rows": "rows of the affinity matrix computed at once",
    "layers": "encoder blocks whose features are used, e.g. -1 or 8,11 (default: the last)",
    "query_size": "short side queries are resized to (default: --image-size)",
    "batch_size": "images per encoder batch",
}
"""Help of the ``build`` flag of every :class:`ReCoSettings` field."""


def add_setting_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ReCoSettings` field: ``--no-X`` for settings that are on by
    default, ``--X`` for the other switches, ``--X VALUE`` for values."""
    from dataclasses import fields

    from hbird.cli.common import parse_layers
    from hbird.zeroshot.reco import ReCoSettings

    defaults = ReCoSettings()
    for f in fields(ReCoSettings):
        default, flag = getattr(defaults, f.name), "--" + f.name.replace("_", "-")
        text = SETTING_HELP[f.name]
        if isinstance(default, bool):
            switch = "--no-" + flag[2:] if default else flag
            action = "store_false" if default else "store_true"
            prefix = "skip " if default else ""
            parser.add_argument(switch, dest=f.name, action=action, help=prefix + text)
        elif f.name == "contexts":
            shown = ",".join(default)
            parser.add_argument(flag, default=shown, help=f"{text} (default {shown})")
        elif f.name == "layers":
            parser.add_argument(flag, type=parse_layers, help=text)
        else:
            kind = float if isinstance(default, float) else _positive
            shown = "" if default is None else f" (default {default})"
            parser.add_argument(flag, type=kind, default=default, help=text + shown)


def settings_from_args(args: argparse.Namespace) -> dict:
    """The :class:`ReCoSettings` fields ``build``'s flags give."""
    from dataclasses import fields

    from hbird.zeroshot.reco import ReCoSettings

    settings = {f.name: getattr(args, f.name) for f in fields(ReCoSettings)}
    settings["contexts"] = tuple(c.strip() for c in args.contexts.split(",") if c.strip())
    return settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hbird.zeroshot.reco import DEFAULT_ENCODER

    sub = parser.add_subparsers(
        dest="zeroshot_command", metavar="{index,build,predict,plus}", required=True
    )
    index = sub.add_parser(
        "index", help="CLIP image embeddings of an unlabelled folder (resumable)"
    )
    index.add_argument(
        "--images", type=Path, required=True, help="folder of unlabelled images (any depth)"
    )
    index.add_argument(
        "--clip",
        required=True,
        help="CLIP model: an open_clip name (ViT-L-14-336), hf:ID or test_clip",
    )
    index.add_argument(
        "--clip-weights", help="local CLIP checkpoint file or folder (or an open_clip tag)"
    )
    index.add_argument("--out", type=Path, required=True, help="collection folder to create")
    index.add_argument("--batch-size", type=_positive, default=32, help="images per CLIP batch")
    for p in (index,):
        p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
        p.add_argument("--overwrite", action="store_true", help="replace an existing collection")
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    build = sub.add_parser(
        "build", help="a reference per named class (needs an indexed collection)"
    )
    build.add_argument(
        "--collection", type=Path, required=True, help="collection folder (hbird zeroshot index)"
    )
    build.add_argument(
        "--classes", required=True, help="classes.txt (one name per line) or a comma list"
    )
    build.add_argument(
        "--rename",
        nargs="+",
        default=[],
        metavar="NAME=PROMPT",
        help='prompt a class by other words, e.g. parking="parking lot"',
    )
    build.add_argument(
        "--encoder", default=DEFAULT_ENCODER, help=f"image encoder (default {DEFAULT_ENCODER})"
    )
    build.add_argument(
        "--weights", help="local weights of the encoder (default: its published ones)"
    )
    build.add_argument(
        "--clip-weights", help="weights of the collection's CLIP (default: as recorded)"
    )
    build.add_argument(
        "--dense-clip", help="DenseCLIP model, a CLIP ResNet (the paper: RN50x16); none: off"
    )
    build.add_argument("--dense-clip-weights", help="local weights of the DenseCLIP model")
    build.add_argument("--out", type=Path, required=True, help="folder for the references")
    add_setting_arguments(build)
    build.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    build.add_argument("--overwrite", action="store_true", help="replace existing references")
    build.add_argument("--quiet", action="store_true", help="no progress bars")

    predict = sub.add_parser("predict", help="class ids for query images from saved references")
    predict.add_argument(
        "--refs", type=Path, required=True, help="references folder (hbird zeroshot build)"
    )
    predict.add_argument(
        "--query", type=Path, nargs="+", required=True, help="image files or folders"
    )
    predict.add_argument(
        "--out", type=Path, required=True, help="folder for <stem>.png class-id masks"
    )
    predict.add_argument("--weights", help="local weights of the encoder, if they moved")
    predict.add_argument(
        "--dense-clip-weights", help="local weights of the DenseCLIP model, if they moved"
    )
    predict.add_argument(
        "--no-overlays", action="store_true", help="skip the <stem>_overlay.png pictures"
    )
    predict.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    predict.add_argument("--quiet", action="store_true", help="no progress bars")

    _add_plus_arguments(
        sub.add_parser("plus", help="ReCo+: a student trained on ReCo's pseudo-labels (resumable)")
    )


def read_classes(text: str) -> list[str]:
    """``classes.txt`` (one name per line, blank lines skipped) or ``a,b,c``."""
    path = Path(text)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    elif "," in text or not path.suffix:
        names = [n.strip() for n in text.split(",") if n.strip()]
    else:
        raise InputError(f"--classes {text}: no such file; give classes.txt or a comma list")
    if not names:
        raise InputError(f"--classes {text} names no class")
    return names


def read_renames(items: list[str]) -> dict[str, str]:
    renames = {}
    for item in items:
        name, sep, prompt = item.partition("=")
        if not sep or not name.strip() or not prompt.strip():
            raise InputError(f'--rename {item!r} is not NAME=PROMPT (e.g. parking="parking lot")')
        renames[name.strip()] = prompt.strip().strip("\"'")
    return renames


def _index(args: argparse.Namespace) -> int:
    from hbird.io.files import check_output
    from hbird.zeroshot.collection import ImageCollection

    check_output(args.out, "--out")
    coll = ImageCollection.build(
        args.images,
        args.clip,
        args.out,
        clip_weights=args.clip_weights,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(f"indexed {len(coll)} images with {args.clip} into {args.out}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from hbird.io.files import check_output, check_replaceable, has_file
    from hbird.zeroshot.reco import META_FILE, ReCo

    check_output(args.out, "--out")
    check_replaceable(
        args.out, "saved ReCo references", has_file(META_FILE), args.overwrite, "--overwrite"
    )
    classes, renames = read_classes(args.classes), read_renames(args.rename)
    dense = None if args.dense_clip in (None, "", "none") else args.dense_clip
    reco = ReCo(
        collection=args.collection,
        encoder=args.encoder,
        weights=args.weights,
        dense_clip=dense,
        dense_clip_weights=args.dense_clip_weights,
        clip_weights=args.clip_weights,
        device=args.device,
        progress=not args.quiet,
        **settings_from_args(args),
    )
    reco.build(classes, renames=renames)
    reco.save(args.out, overwrite=args.overwrite)
    print(f"built references for {len(classes)} classes into {args.out}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from hbird.cli.predict import query_files, write_prediction
    from hbird.io.files import check_output, write_text
    from hbird.io.images import load_image
    from hbird.zeroshot.reco import ReCo

    check_output(args.out, "--out")
    files = query_files(args.query)
    reco = ReCo.load(
        args.refs,
        weights=args.weights,
        dense_clip_weights=args.dense_clip_weights,
        device=args.device,
        progress=False,
    )
    spec = reco.label_spec
    for file in tqdm(files, desc="predicting", unit="img", disable=args.quiet):
        image = load_image(file)
        prediction = reco.predict_dense([image])[0]
        write_prediction(args.out, file.stem, image, prediction, spec, not args.no_overlays)
    write_text(args.out / "classes.txt", "\n".join(reco.classes) + "\n")
    print(f"wrote {len(files)} prediction(s) to {args.out} (class ids: classes.txt)")
    return 0


def _add_plus_arguments(parser: argparse.ArgumentParser) -> None:
    from hbird.zeroshot.plus import PRESETS, STUDENTS

    parser.add_argument("--refs", required=True, help="references saved by hbird zeroshot build")
    parser.add_argument(
        "--dataset", required=True, help="the split to pseudo-label and train on (a spec)"
    )
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="paper",
        help="paper (supplementary B.4: 20k iterations, batch 8, crop 320, deeplabv3_resnet101) "
        "or tiny (a 3-layer CNN, 150 iterations, crop 48: tests and CPU); flags override it",
    )
    parser.add_argument("--student", choices=STUDENTS.names(), help="the student network")
    parser.add_argument(
        "--student-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="student option, e.g. weights_backbone=resnet101.pth or arch=vit_small_patch16_224 "
        "(repeatable)",
    )
    parser.add_argument("--iterations", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--crop", type=int, help="training crop side (paper: 320)")
    parser.add_argument("--heldout-fraction", type=float, help="share held out for selection")
    parser.add_argument("--eval-every", type=int, help="iterations between held-out scores")
    parser.add_argument("--save-every", type=int, help="iterations between resumable saves")
    parser.add_argument("--num-workers", type=int, help="data-loader workers")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="torch device for the teacher and the student")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out")
    parser.add_argument(
        "--score-on", metavar="SPEC", help="score the selected student on this labelled split"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _plus_config(args: argparse.Namespace):
    """The preset with the flags given on top."""
    from hbird.io.options import parse_pairs
    from hbird.zeroshot.plus import PRESETS

    config = PRESETS[args.preset]
    changes: dict[str, Any] = {
        name: getattr(args, name)
        for name in (
            "student",
            "iterations",
            "batch_size",
            "lr",
            "heldout_fraction",
            "eval_every",
            "save_every",
            "num_workers",
            "seed",
            "device",
        )
        if getattr(args, name) is not None
    }
    if args.student is not None and args.student != config.student:
        changes["student_options"] = {}
    if args.student_option:
        changes["student_options"] = {
            **changes.get("student_options", config.student_options),
            **parse_pairs(args.student_option, "--student-option", "weights_backbone=r101.pth"),
        }
    if args.crop is not None:
        changes["augment"] = {**config.augment, "crop": args.crop}
    return dataclasses.replace(config, resume=args.resume, **changes)


def _plus(args: argparse.Namespace) -> int:
    from hbird.data import create_dataset
    from hbird.io.files import write_json
    from hbird.zeroshot.plus import load_student, reco_teacher, score_student, train_plus

    config = _plus_config(args)
    dataset = create_dataset(args.dataset)
    if dataset.label_spec.task != "segmentation":
        raise InputError(f"--dataset {args.dataset} is not a segmentation dataset")
    scored = create_dataset(args.score_on) if args.score_on else None  # fail before training
    teacher = reco_teacher(args.refs, dataset, args.device)
    _, summary = train_plus(dataset, teacher, args.out, config, progress=not args.quiet)
    out = Path(args.out)
    summary = {**summary, "refs": str(args.refs), "dataset": args.dataset}
    if scored is not None:
        scores = score_student(load_student(out / "student.safetensors"), scored, not args.quiet)
        summary["score_on"] = {"dataset": args.score_on, **scores.to_dict()}
    write_json(out / "summary.json", summary)
    line = (
        f"best held-out pseudo-label mIoU {summary['best_miou']:.4f} at step {summary['best_step']}"
    )
    if scored is not None:
        line += f"; on {args.score_on}: mIoU {summary['score_on']['miou']:.4f}"
    print(f"{line}; student in {out / 'student.safetensors'}")
    return 0


def interrupted(args: argparse.Namespace) -> str:
    if args.zeroshot_command == "index":
        return f"the finished shards are kept in {args.out}.partial; run the same command to resume"
    if args.zeroshot_command == "plus":
        return f"the pseudo-labels and the last checkpoint are kept in {args.out}; add --resume"
    return "nothing was kept; run the command again"


def run(args: argparse.Namespace) -> int:
    commands = {"index": _index, "build": _build, "predict": _predict, "plus": _plus}
    return commands[args.zeroshot_command](args)
