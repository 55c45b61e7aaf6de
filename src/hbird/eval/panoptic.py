"""The panoptic retrieval protocol: ``hbird eval --protocol panoptic-retrieval``.

As the retrieval protocol (prompt = the train split, queries = the val split, the same
settings and presets), on a panoptic dataset (``folder`` with ``panoptic/``,
``cityscapes_panoptic``, ``coco_panoptic``, ``kitti_step_panoptic``,
``synthetic_panoptic``): the semantic map by eq. 1, thing instances by ``grouping``
(:mod:`hbird.panoptic.retrieval`), scored by panoptic quality
(:class:`hbird.metrics.PanopticQuality`). With a run folder, both memories
(``bank/`` and, for offsets, ``bank_offsets/``) and every finished query batch are kept,
so an interrupted run resumes. Pictures show instance outlines over the image.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hbird.data.panoptic import is_panoptic
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.report import Report, fmt, save_picture
from hbird.eval.retrieval import check_run_folder, fitted_predictor, run_timings, score_run
from hbird.io.files import write_json
from hbird.metrics import PanopticQuality
from hbird.panoptic.retrieval import (
    GROUPINGS,
    OFFSET_MEMORY,
    OffsetTargets,
    PanopticRetriever,
)

PANOPTIC_DATASETS = "folder (with panoptic/), cityscapes_panoptic, coco_panoptic, kitti_step_panoptic, synthetic_panoptic"


class PanopticQueries:
    """Queries whose ``label`` is the :class:`~hbird.data.panoptic.PanopticMap`."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        sample = self.dataset[i]
        return replace(sample, label=sample.panoptic)


class PanopticReport(Report):
    """A :class:`Report` whose metrics are PQ, SQ, RQ (all, things, stuff) and whose
    per-class rows are ``class, kind, pq, sq, rq, tp, fp, fn``."""

    @property
    def headline(self) -> tuple[str, float]:
        return "pq", self.metrics["pq"]

    def heading(self) -> list[str]:
        lines = super().heading()
        grouping = self.config.get("grouping")
        how = (
            "connected components of each predicted thing class"
            if grouping == "components"
            else "eq. 1 over prompt patches' offsets to their instance centre, grouped as "
            "Panoptic-DeepLab does (centres from the offset votes, each thing pixel to its "
            "nearest centre)"
        )
        lines[0] = lines[0] + " (panoptic)"
        return [
            *lines,
            f"Panoptic: semantic map by eq. 1; thing instances by {how} (grouping {grouping}).",
        ]

    def results(self) -> list[str]:
        rows, self.per_class = self.per_class, []  # the base table has IoU columns
        try:
            lines = super().results()
        finally:
            self.per_class = rows
        table = [
            "",
            "| class | kind | PQ | SQ | RQ | TP | FP | FN |",
            "|---|---|---|---|---|---|---|---|",
        ]
        table += [
            f"| {r['class']} | {r['kind']} | {fmt(r['pq'])} | {fmt(r['sq'])} | {fmt(r['rq'])} "
            f"| {r['tp']} | {r['fp']} | {r['fn']} |"
            for r in rows
        ]
        lines = [
            "## Pictures (image | ground truth | prediction, segment outlines in white)"
            if line.startswith("## Pictures")
            else line
            for line in lines
        ]
        cut = next((i for i, line in enumerate(lines) if line.startswith("Seconds")), len(lines))
        return lines[: cut - 1] + table + lines[cut - 1 :]


def evaluate_panoptic(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    grouping: str = "offsets",
    prompt_indices: list[int] | None = None,
    progress: bool = True,
    **config: Any,
) -> PanopticReport:
    """Run the panoptic retrieval protocol; write the run folder if ``out`` is given.

    Args:
        encoder, dataset, out, preset, overrides, prompt_indices, **config: as for
            :func:`hbird.evaluate`.
        grouping: ``"offsets"`` (default) or ``"components"``.
    """
    if grouping not in GROUPINGS:
        raise InputError(f"grouping must be one of {', '.join(GROUPINGS)}, not {grouping!r}")
    cfg, prompt, queries, description = prepare(
        encoder, dataset, preset, overrides, config, prompt_indices
    )
    if not (is_panoptic(prompt) and is_panoptic(queries)):
        raise InputError(
            f"{description} has no instance labels; the panoptic protocol needs a panoptic "
            f"dataset: {PANOPTIC_DATASETS}"
        )
    spec = prompt.label_spec
    out = Path(out) if out is not None else None
    if out is not None:
        record = check_run_folder(out, cfg, f"{description} (grouping {grouping})")
    start = time.perf_counter()
    model = load_encoder(encoder, cfg)
    semantic = fitted_predictor(cfg, model, prompt, out, progress)
    offsets = None
    if grouping == "offsets":
        offset_cfg = replace(cfg, **OFFSET_MEMORY)
        offsets = fitted_predictor(
            offset_cfg, model, OffsetTargets(prompt), out, progress, "bank_offsets"
        )
    if out is not None:
        write_json(out / "config.json", record)
    build_seconds = time.perf_counter() - start
    retriever = PanopticRetriever(
        semantic, offsets, prompt.thing_classes, int(spec.ignore_index), grouping
    )
    semantic.timings.reset()
    semantic.progress = False
    if offsets is not None:  # one clock for both memories' encode, search and decode
        offsets.timings, offsets.progress = semantic.timings, False
    metric = PanopticQuality(
        int(spec.num_classes), prompt.thing_classes, spec.ignore_index, spec.class_names
    )
    scored = score_run(
        retriever.predict,
        PanopticQueries(queries),
        metric,
        cfg,
        semantic.timings,
        out,
        lambda q, p: save_picture(out, q, p, spec),
        build_seconds,
        progress,
    )
    scores = scored.metric.compute()
    memory = len(semantic.bank_) + (len(offsets.bank_) if offsets is not None else 0)
    report = PanopticReport(
        task="panoptic",
        dataset=description,
        metrics={k: (None if v != v else v) for k, v in scores.headline.items()},
        per_class=scores.per_class(),
        config={**cfg.to_dict(), "grouping": grouping},
        counts={"prompt_images": len(prompt), "memory_entries": memory, "queries": scored.done},
        timings=run_timings(scored),
        notes=[
            "PQ over classes with TP + FP + FN > 0 (Kirillov et al. 2019): matches at IoU > 0.5, "
            "predicted pixels on void left out of the union, crowd regions never false negatives.",
            *(
                [
                    "The offset memory is built without augmentation epochs (rescaling would "
                    "rescale the offsets)."
                ]
                if grouping == "offsets"
                else []
            ),
        ],
        pictures=scored.overlays,
        search=semantic.index_.describe(),
    )
    if out is not None:
        report.write(out)
    return report
