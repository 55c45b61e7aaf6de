"""``hbird zeroshot plus``: train a ReCo+ student on ReCo's pseudo-labels (issue 11, step 8).

    hbird zeroshot plus --refs refs/ \\
        --dataset cityscapes:root=/data/cityscapes:split=train:classes=27 --out plus/

pseudo-labels the dataset with the saved references (``out/pseudo_labels``, resumable),
holds out a seeded share for checkpoint selection (on pseudo-labels only), trains the
student (``--preset paper``: supplementary B.4) and writes ``out/student.safetensors``
and ``out/summary.json``. ``--score-on SPEC`` scores the selected student against a
labelled split afterwards (reported, never used to select).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from hbird.errors import InputError
from hbird.io.files import write_json
from hbird.io.options import parse_pairs


def add_plus_arguments(parser: argparse.ArgumentParser) -> None:
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


def plus_config(args: argparse.Namespace):
    """The preset with the flags given on top."""
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


def reco_teacher(refs: str | Path, dataset: Any, device: str | None):
    """``ReCo.load(refs)`` as a teacher of ``dataset``'s label ids: predicted over the
    dataset's vocabulary (:func:`hbird.data.vocabulary.vocabulary_of`), then mapped."""
    from hbird.data.vocabulary import vocabulary_of
    from hbird.zeroshot.reco import ReCo

    reco = ReCo.load(refs, device=device or "cpu")
    vocabulary = vocabulary_of(dataset)
    if tuple(reco.classes) != tuple(vocabulary.names):
        raise InputError(
            f"--refs {refs} were built for the classes {list(reco.classes)[:6]}..., but "
            f"{dataset!r} is predicted over {list(vocabulary.names)[:6]}...; build the "
            "references with the dataset's class names (in its order)"
        )
    return lambda image: vocabulary.to_labels(reco.predict([image])[0])


def run_plus(args: argparse.Namespace) -> int:
    from hbird.data import create_dataset
    from hbird.zeroshot.plus import load_student, score_student, train_plus

    config = plus_config(args)
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
