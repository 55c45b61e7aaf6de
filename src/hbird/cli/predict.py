"""``hbird predict``: dense predictions for query images from a prompt folder or a bank."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from hbird.cli.common import (
    add_predictor_arguments,
    given_settings,
    predictor_from_args,
    prompt_dataset,
)
from hbird.errors import InputError
from hbird.io.files import atomic_file, check_output, write_json
from hbird.io.images import IMAGE_SUFFIXES, list_images, load_image
from hbird.memory.bank import check_bank_path
from hbird.predictor import InContextPredictor
from hbird.specs import BankSpec, SearchConfig

SETTING_FLAGS = {"root": "--prompt"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--prompt",
        type=Path,
        help="prompt folder: images/ + masks/ (or depth/), optional classes.txt",
    )
    source.add_argument(
        "--bank", type=Path, help="a memory bank saved by 'hbird bank build' or predictor.save()"
    )
    parser.add_argument(
        "--query", type=Path, nargs="+", required=True, help="query image files or folders"
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument(
        "--save-bank", type=Path, help="also save the memory built from --prompt here"
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay pictures")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    add_predictor_arguments(parser, with_bank=True)


def query_files(paths: list[Path]) -> list[Path]:
    """Expand folders, check every file exists, refuse duplicate stems (outputs would clash)."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(list_images(p))
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"query {p} does not exist; give image files or folders of images")
    if not files:
        raise InputError(
            f"no query images found in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise InputError(
                f"queries {seen[f.stem]} and {f} share the name {f.stem!r}; their outputs would collide"
            )
        seen[f.stem] = f
    return files


def load_predictor(args: argparse.Namespace) -> InContextPredictor:
    if args.bank is not None:  # a bank setting given here is refused by load: rebuild
        settings = {**given_settings(args, BankSpec), **given_settings(args, SearchConfig)}
        encoder, weights = settings.pop("encoder", None), settings.pop("weights", None)
        return InContextPredictor.load(
            args.bank, encoder=encoder, weights=weights, progress=not args.quiet, **settings
        )
    predictor = predictor_from_args(args).fit_dataset(prompt_dataset(args, args.prompt))
    if args.save_bank is not None:
        predictor.save(args.save_bank)
    return predictor


def write_prediction(out: Path, stem: str, image, prediction, spec, overlays: bool) -> list[str]:
    """Write ``<stem>.png`` (+ ``.npy`` for depth) and ``<stem>_overlay.png``; return file names."""
    from hbird.io.images import save_depth_png, save_label_png
    from hbird.viz import save_prediction_panel

    written = [f"{stem}.png"]
    if spec.is_classification:
        save_label_png(out / f"{stem}.png", prediction.labels.numpy())
    else:
        values = prediction.labels.numpy().astype(np.float32)
        save_depth_png(out / f"{stem}.png", values)
        with atomic_file(out / f"{stem}.npy") as tmp:
            np.save(tmp, values)
        written.append(f"{stem}.npy")
    if overlays:
        save_prediction_panel(
            out / f"{stem}_overlay.png",
            image,
            prediction.labels.numpy(),
            kind="segmentation" if spec.is_classification else "depth",
            confidence=prediction.confidence.numpy(),
            ignore_index=spec.ignore_index,
            class_names=spec.class_names,
        )
        written.append(f"{stem}_overlay.png")
    return written


def interrupted(args: argparse.Namespace) -> str:
    return (
        f"the predictions written so far are kept in {args.out} (settings.json comes last); "
        "run the same command again to finish"
    )


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out")
    if args.save_bank is not None:
        check_bank_path(args.save_bank)
        check_output(args.save_bank, "--save-bank")
    files = query_files(args.query)
    predictor = load_predictor(args)
    spec = predictor.label_spec_
    outputs = {}
    predictor.progress = False  # one bar over the files instead of one per call
    for file in tqdm(files, desc="predicting", unit="img", disable=args.quiet):
        image = load_image(file)
        prediction = predictor.predict_dense([image])[0]
        args.out.mkdir(parents=True, exist_ok=True)  # after the first success: no empty folder
        outputs[str(file)] = write_prediction(
            args.out, file.stem, image, prediction, spec, not args.no_overlays
        )
    write_json(
        args.out / "settings.json",
        {
            "predictor": {**predictor.spec_.to_dict(), **predictor.search.to_dict()},
            "label_spec": spec.to_dict(),
            "bank": {
                "entries": len(predictor.bank_),
                "images": predictor.bank_.num_images,
                "source": str(args.bank or args.prompt),
            },
            "encoder": predictor.bank_.encoder,
            "index": predictor.index_.describe(),
            "outputs": outputs,
        },
    )
    print(f"wrote {len(files)} prediction(s) to {args.out}")
    return 0
