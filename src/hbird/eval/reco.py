"""The ``reco`` protocol: zero-shot segmentation with saved ReCo references (issue 11).

No prompt, no labels seen: the classes are named, ReCo's references predict class ids
directly, and they are scored with the confusion matrix as they are (no Hungarian
matching): mIoU, pixel accuracy and per-class IoU. The run folder also holds pictures:
``archives/`` (each class's first archive images with their seeds boxed, over the seed
scores ``s``: why a class found what it found) and ``pictures/`` (predictions).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from hbird.errors import InputError
from hbird.eval.report import Report, fmt, save_picture
from hbird.eval.scoring import new_metric, score_queries, scores_from_metric
from hbird.io.files import write_json

ARCHIVE_IMAGES = 5
"""Archive images drawn per class (the supplement's Fig. 1 shows 5 of 50)."""


class RecoReport(Report):
    """A :class:`Report` whose heading says what ReCo ran with."""

    def heading(self) -> list[str]:
        cfg = self.config
        s = cfg.get("settings", {})
        ids = cfg.get("identities", {})
        enc, dense = ids.get("encoder") or {}, ids.get("dense_clip") or {}
        coll = ids.get("collection") or {}
        on = {True: "on", False: "off"}
        contexts = ", ".join(s.get("contexts", []))
        tau = fmt(s.get("context_temperature"), 2)
        elimination = f"on ({contexts}; τ = {tau})" if s.get("context_elimination") else "off"
        grid = "official (Alg. 1)" if s.get("official_grid") else "correct"
        return [
            f"# ReCo ({enc.get('name')}) on {self.dataset}",
            "",
            "Zero-shot segmentation by retrieve and co-segment (Shin et al. 2022): "
            f"{len(cfg.get('classes', []))} named classes; archives of k = {s.get('k')} from "
            f"{coll.get('num_images')} collection images ({(coll.get('clip') or {}).get('name')}); "
            f"{s.get('n_seeds')} seed(s) per image; language guidance "
            f"{on[bool(s.get('language_guidance') and dense)]}; context elimination {elimination}; "
            f"dense inference {on[bool(s.get('dense_inference') and dense)]} "
            f"(DenseCLIP {dense.get('name', 'none')}); no CRF; {grid} grid slice.",
            f"Queries scored: {self.counts.get('queries')} at their original resolution.",
        ]


def _check_run_folder(out: Path, record: dict[str, Any]) -> None:
    import json

    path = out / "config.json"
    if path.is_file() and json.loads(path.read_text()) != record:
        raise InputError(
            f"{out} holds a reco evaluation with other references, dataset or settings; choose "
            "another --out, or delete it to start over"
        )


def _open_queries(dataset: Any, split: str | None):
    from hbird.data.datasets import create_dataset
    from hbird.eval.inputs import DEFAULT_SPLITS
    from hbird.io.options import parse_spec

    if not isinstance(dataset, str):
        return dataset, getattr(dataset, "description", type(dataset).__name__)
    name, fields = parse_spec(dataset)
    split = split or fields.get("split") or DEFAULT_SPLITS.get(name, ("train", "val"))[1]
    return create_dataset(dataset, split=split), f"{dataset} ({split})"


def save_archive_pictures(out: Path, reco, collection, images: int = ARCHIVE_IMAGES) -> list[str]:
    """``out/archives/<i>_<class>.png`` for every class: its first archive images, seeds boxed."""
    from hbird.viz.archive import save_archive_picture
    from hbird.zeroshot.clip.base import clip_resize_crop

    written = []
    for i, (name, prompt) in enumerate(zip(reco.classes, reco.prompts)):
        archive = reco.archives[prompt]
        ids = archive.ids[:images].tolist()
        crops = [clip_resize_crop(collection.load_image(j), reco.settings.image_size) for j in ids]
        file = out / "archives" / f"{i:03d}_{''.join(c if c.isalnum() else '_' for c in name)}.png"
        title = name if prompt == name else f"{name} ({prompt})"
        save_archive_picture(
            file,
            crops,
            archive.seeds[: len(ids)].tolist(),
            tuple(archive.scores.shape[1:]),
            scores=archive.scores[: len(ids)],
            title=title,
        )
        written.append(file.relative_to(out).as_posix())
    return written


def evaluate_reco(
    refs: str | Path,
    dataset: Any,
    out: str | Path | None = None,
    split: str | None = None,
    max_queries: int | None = None,
    overlays: int = 8,
    archive_images: int = ARCHIVE_IMAGES,
    device: str = "cpu",
    progress: bool = True,
    **load: Any,
) -> RecoReport:
    """Score saved ReCo references ``refs`` on ``dataset`` (a spec string or a dataset);
    with ``out``, write the run folder (resumable). ``load`` goes to :meth:`ReCo.load`."""
    from hbird.zeroshot.collection import ImageCollection
    from hbird.zeroshot.reco import ReCo

    reco = ReCo.load(refs, device=device, progress=False, **load)
    queries, description = _open_queries(dataset, split)
    spec = queries.label_spec
    predict, vocabulary = reco.predict_dense, getattr(queries, "vocabulary", None)
    if vocabulary is not None and tuple(vocabulary.names) == tuple(reco.classes):
        # predicted over the dataset's own vocabulary (COCO-Stuff-27: 171 names), then mapped
        def predict(images):
            dense = reco.predict_dense(images)
            return [dataclasses.replace(p, labels=vocabulary.to_labels(p.labels)) for p in dense]

        reco_classes = spec.class_names or tuple(map(str, range(spec.num_classes)))
    elif not spec.is_classification or spec.num_classes != len(reco.classes):
        raise InputError(
            f"{description} has {spec.num_classes} classes but the references in {refs} name "
            f"{len(reco.classes)} ({', '.join(reco.classes[:5])}...); build references for the "
            "dataset's classes, in its order (hbird zeroshot build --classes)"
        )
    else:
        reco_classes = reco.classes
    notes = []
    if spec.class_names is not None and tuple(spec.class_names) != tuple(reco_classes):
        differ = [f"{a} ≠ {b}" for a, b in zip(spec.class_names, reco_classes) if a != b]
        notes.append(
            f"Class names differ from the dataset's ({', '.join(differ[:5])}); ids are scored by position."
        )
    scored_spec = type(spec)(
        num_classes=spec.num_classes,
        ignore_index=spec.ignore_index,
        class_names=tuple(reco_classes),
    )
    record = {
        "refs": str(Path(refs).resolve()),
        "dataset": description,
        "classes": reco.classes,
        "renames": reco.renames,
        "settings": reco.settings.to_dict(),
        "identities": reco._recorded,
    }
    out = Path(out) if out is not None else None
    archives: list[str] = []
    if out is not None:
        _check_run_folder(out, record)
        write_json(out / "config.json", record)
        coll_path = (reco._recorded.get("collection") or {}).get("path")
        if archive_images and coll_path and Path(coll_path).is_dir():
            archives = save_archive_pictures(
                out, reco, ImageCollection.load(coll_path), archive_images
            )
        elif archive_images:
            notes.append(f"No archive pictures: the collection {coll_path} is not there.")
    start = time.perf_counter()
    scored = score_queries(
        predict,
        queries,
        new_metric(scored_spec),
        batch_size=1,
        limit=max_queries,
        overlay=None if out is None else lambda q, p: save_picture(out, q, p, scored_spec),
        overlays=overlays,
        progress_file=None if out is None else out / "progress.json",
        progress=progress,
    )
    metrics, per_class, score_notes = scores_from_metric(scored.metric)
    report = RecoReport(
        task="segmentation",
        dataset=description,
        metrics=metrics,
        per_class=per_class,
        config=record,
        counts={"queries": scored.done, "archives": len(archives)},
        timings={
            "run": time.perf_counter() - start,
            **{f"per_query_{k}": v / max(scored.done, 1) for k, v in scored.seconds.items()},
        },
        notes=score_notes + notes,
        pictures=archives + scored.overlays,
    )
    if out is not None:
        report.write(out)
    return report


def run_from_args(args: Any, config: dict[str, Any]) -> int:
    """``hbird eval --protocol reco``: needs ``--refs``; reads ``--max-queries``,
    ``--overlays``, ``--device`` and ``--quiet``."""
    if args.refs is None:
        raise InputError(
            "--protocol reco needs --refs REFS: references built by `hbird zeroshot build`"
        )
    report = evaluate_reco(
        args.refs,
        args.dataset,
        out=args.out,
        split=config.get("query_split"),
        max_queries=config.get("max_queries"),
        overlays=config.get("overlays", 8),
        device=config.get("device", "cpu"),
        progress=not args.quiet,
    )
    print(report.summary())
    if args.out is not None:
        print(f"run folder: {args.out}")
    return 0
