"""``hbird predict``: dense predictions for query images from a prompt folder or a bank."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from hbird.cli.common import (
    LABEL_FLAGS,
    add_predictor_arguments,
    flag_of,
    given_settings,
    predictor_from_args,
    prompt_dataset,
)
from hbird.data.checks import skip_bad_files
from hbird.errors import InputError
from hbird.io.files import atomic_file, check_output, write_json
from hbird.io.images import IMAGE_SUFFIXES, file_size, list_images, load_image
from hbird.memory.bank import MemoryBank, check_bank_path
from hbird.predictor import InContextPredictor
from hbird.specs import RUNTIME_SEARCH, BankSpec, SearchConfig

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


LOCATORS = ("encoder", "weights")
"""Bank settings ``--bank`` still takes: where the bank's encoder is (checked against it)."""


def check_bank_flags(args: argparse.Namespace) -> None:
    """With ``--bank``, refuse the flags the bank fixes (its spec and labels): they could
    not change anything. Only the search flags apply, and ``--encoder``/``--weights``,
    which say where the bank's encoder is."""
    if args.save_bank is not None:
        raise InputError(
            "--save-bank saves the memory built from --prompt; with --bank there is no new "
            f"memory to save ({args.bank} is already a bank: copy its folder instead)"
        )
    fixed = {flag_of(f): f.name for f in fields(BankSpec) if f.name not in LOCATORS}
    fixed.update({flag: name for name, flag in LABEL_FLAGS.items()})
    given = {flag: name for flag, name in fixed.items() if getattr(args, name, None) is not None}
    if not given:
        return
    manifest = MemoryBank.read_manifest(args.bank)
    recorded = {**manifest.get("config", {}), **manifest.get("label_spec", {})}
    built = ", ".join(f"{flag} {recorded[n]}" for flag, n in given.items() if n in recorded)
    one = len(given) == 1
    wanted = " ".join(flag_text(flag, getattr(args, name)) for flag, name in given.items())
    search = ", ".join(flag_of(f) for f in fields(SearchConfig))
    raise InputError(
        f"{', '.join(given)} {'is a bank setting' if one else 'are bank settings'}, fixed "
        f"when {args.bank} was built ({built}): with --bank {'it' if one else 'they'} cannot "
        f"apply. To change {'it' if one else 'them'}, rebuild the bank (hbird bank build "
        f"--prompt DIR --out NEW_BANK {wanted}) or predict from --prompt. With --bank only "
        f"the search flags apply: {search} (and --encoder/--weights, to find the bank's encoder)"
    )


def flag_text(flag: str, value: Any) -> str:
    """A flag as typed: ``--memory-size 10``, ``--no-pretrained``, ``--layers 8,9``."""
    if isinstance(value, bool):
        return flag if value else "--no-" + flag[2:]
    if isinstance(value, list):  # KEY=VALUE options
        return " ".join(f"{flag} {item}" for item in value)
    if isinstance(value, tuple):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {value}"


def load_predictor(args: argparse.Namespace) -> InContextPredictor:
    if args.bank is not None:
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

    if spec.is_classification:
        save_label_png(out / f"{stem}.png", prediction.labels.numpy())
    else:
        values = prediction.labels.numpy().astype(np.float32)
        save_depth_png(out / f"{stem}.png", values)
        with atomic_file(out / f"{stem}.npy") as tmp:
            np.save(tmp, values)
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
    return output_names(stem, spec, overlays)


def output_names(stem: str, spec: Any, overlays: bool) -> list[str]:
    """The files one query's prediction is written to, in ``--out``."""
    depth = [] if spec.is_classification else [f"{stem}.npy"]
    return [f"{stem}.png", *depth, *([f"{stem}_overlay.png"] * overlays)]


def readable_queries(files: list[Path], skip_bad: bool) -> tuple[list[Path], dict[str, str]]:
    """The queries that open and verify (cheap: no decoding), and ``{file: problem}`` for the
    others; without ``skip_bad`` any bad query stops the run before the expensive work."""
    bad = {}
    for file in files:
        try:
            file_size(file, "query")
        except InputError as err:
            bad[str(file)] = str(err)
    skip_bad_files(list(bad.values()), "query", skip_bad)
    if len(bad) == len(files):
        raise InputError("no usable query image is left; give readable images")
    return [f for f in files if str(f) not in bad], bad


def settings_record(args: argparse.Namespace, predictor: InContextPredictor) -> dict[str, Any]:
    """What decides the predictions (``settings.json`` without its outputs)."""
    return {
        "predictor": {**predictor.spec_.to_dict(), **predictor.search.to_dict()},
        "label_spec": predictor.label_spec_.to_dict(),
        "bank": {
            "entries": len(predictor.bank_),
            "images": predictor.bank_.num_images,
            "source": str(Path(args.bank or args.prompt).resolve()),
        },
        "encoder": predictor.bank_.encoder,
        "index": predictor.index_.describe(),
    }


def changed_settings(new: dict[str, Any], old: dict[str, Any]) -> list[str]:
    """What differs between two ``settings.json`` records (outputs aside)."""
    changed = [k for k in new if k != "predictor" and new[k] != old.get(k)]
    a, b = new["predictor"], old.get("predictor", {})
    names = sorted((set(a) | set(b)) - set(RUNTIME_SEARCH))
    return changed + ["--" + n.replace("_", "-") for n in names if a.get(n) != b.get(n)]


def kept_outputs(out: Path, record: dict[str, Any], files: list[Path]) -> dict[str, list[str]]:
    """The outputs a previous run left in ``out`` with the same settings: ``{query: files}``.

    Refuses an ``out`` whose ``settings.json`` holds other settings, and one that holds an
    output of these queries but no ``settings.json``: the mix would go unseen.
    """
    path = out / "settings.json"
    if not path.is_file():
        clash = next(
            (out / f"{f.stem}.png" for f in files if (out / f"{f.stem}.png").exists()), None
        )
        if clash is not None:
            raise InputError(
                f"{clash} exists but {out} has no settings.json, so hbird cannot tell how it "
                "was made; choose another --out, or delete the folder to start over"
            )
        return {}
    old = json.loads(path.read_text())
    changed = changed_settings(record, old)
    if changed:
        raise InputError(
            f"{out} holds predictions made with other settings ({', '.join(changed)} differ); "
            "choose another --out, or delete it to start over"
        )
    outputs = old.get("outputs", {})
    return {q: names for q, names in outputs.items() if all((out / n).is_file() for n in names)}


def interrupted(args: argparse.Namespace) -> str:
    if not args.out.exists():
        return f"no prediction was finished, {args.out} was not made; run the same command again"
    return (
        f"the predictions written so far are kept in {args.out} (listed in its "
        "settings.json); run the same command again to finish: they are kept, not redone"
    )


def run(args: argparse.Namespace) -> int:
    check_output(args.out, "--out")
    if args.save_bank is not None:
        check_bank_path(args.save_bank)
        check_output(args.save_bank, "--save-bank")
    files = query_files(args.query)
    if args.bank is not None:
        check_bank_flags(args)
    files, skipped = readable_queries(files, args.skip_bad)
    predictor = load_predictor(args)
    spec = predictor.label_spec_
    record = settings_record(args, predictor)
    outputs = kept_outputs(args.out, record, files)
    overlays = not args.no_overlays
    todo = [f for f in files if outputs.get(str(f)) != output_names(f.stem, spec, overlays)]
    if len(todo) < len(files):
        print(f"keeping {len(files) - len(todo)} prediction(s) in {args.out} (same settings)")
    predictor.progress = False  # one bar over the files instead of one per call
    written, settings = 0, args.out / "settings.json"
    try:
        for file in tqdm(todo, desc="predicting", unit="img", disable=args.quiet):
            try:
                image = load_image(file)
            except InputError as err:  # the cheap check passed, decoding failed
                if not args.skip_bad:
                    raise
                skip_bad_files([str(err)], "query", skip_bad=True)
                skipped[str(file)] = str(err)
                continue
            prediction = predictor.predict_dense([image])[0]
            # recorded before this query's files: a run killed between them redoes only it
            write_json(settings, {**record, "outputs": outputs, "skipped": skipped})
            outputs = {q: names for q, names in outputs.items() if Path(q).stem != file.stem}
            outputs[str(file)] = write_prediction(
                args.out, file.stem, image, prediction, spec, overlays
            )
            written += 1
    finally:  # stopped by an error or Ctrl-C too: what was written is recorded
        if args.out.is_dir():
            write_json(settings, {**record, "outputs": outputs, "skipped": skipped})
    print(
        f"wrote {written} prediction(s) to {args.out}"
        + (f"; skipped {len(skipped)} bad file(s), listed in its settings.json" if skipped else "")
    )
    return 0
