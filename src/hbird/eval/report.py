"""What an evaluation leaves in its run folder, and how it reads to a person.

``metrics.json`` (everything numeric), ``per_class.csv``, ``summary.md`` (a table to
paste into a paper), and ``config.json`` (the resolved settings) are written atomically;
``pictures/`` holds the overlays of the first queries.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hbird.io.files import write_json, write_text

if TYPE_CHECKING:
    from hbird.labelspec import LabelSpec


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def layers_text(layers: Any) -> str:
    """How a ``layers`` setting reads in a report (``None`` is the last block; 0 is block 0)."""
    if layers is None:
        return "last"
    return ",".join(map(str, layers)) if isinstance(layers, list | tuple) else str(layers)


def search_text(setting: Any, search: dict[str, Any]) -> str:
    """The index a report searched with: the setting, and what it resolved to when built."""
    if not search:
        return str(setting)
    skip = {
        "kind",
        "dim",
        "ntotal",
        "is_trained",
        "expected_size",
        "seed",
        "train_size",
        "chunk_size",
        "query_chunk_size",
        "factory",
        "keys_dtype",
        "recall_queries",
        "backend",
    }
    params = ", ".join(f"{k} {v}" for k, v in search.items() if k not in skip and v is not None)
    built = search["kind"] + (f" ({params})" if params else "")
    return built if setting == search["kind"] else f"{setting} → {built}"


def save_picture(out: Path, sample: Any, pred: Any, spec: LabelSpec) -> str:
    """Draw ``out/pictures/<name>.png``: image | ground truth | prediction | confidence, or
    for a panoptic prediction (``labels`` a ``(semantic, instance)`` pair) image | ground
    truth | prediction with segment outlines."""
    from hbird.viz import save_prediction_panel

    path = out / "pictures" / f"{sample.name}.png"
    if isinstance(pred.labels, tuple):
        from hbird.viz.panoptic import save_panoptic_panel

        save_panoptic_panel(
            path,
            sample.image,
            pred.labels,
            sample.label,
            ignore_index=spec.ignore_index,
            class_names=spec.class_names,
        )
        return path.relative_to(out).as_posix()
    save_prediction_panel(
        path,
        sample.image,
        pred.labels,
        sample.label,
        kind="segmentation" if spec.is_classification else "depth",
        confidence=pred.confidence,
        ignore_index=spec.ignore_index,
        class_names=spec.class_names,
    )
    return path.relative_to(out).as_posix()


@dataclass
class Report:
    """One evaluation's results.

    Attributes:
        task: ``segmentation`` or ``depth``.
        dataset: the dataset spec or description.
        metrics: headline numbers (``miou``, ``pixel_accuracy``... or ``rmse``, ``abs_rel``...).
        per_class: rows ``{"class", "iou", "precision", "recall"}`` (segmentation).
        config: the resolved :class:`EvalConfig` as a dict.
        counts: prompt images, memory entries, queries scored.
        timings: seconds per stage and per query image.
        notes: sentences the summary must carry (e.g. classes left out of the mean).
        pictures: overlay files relative to the run folder.
        search: the index the queries were searched with, as built (kind and
            parameters, e.g. what ``auto`` chose); empty when there was none.
    """

    task: str
    dataset: str
    metrics: dict[str, Any]
    per_class: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    pictures: list[str] = field(default_factory=list)
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> tuple[str, float]:
        key = "miou" if self.task == "segmentation" else "rmse"
        return key, self.metrics[key]

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "dataset": self.dataset,
            "metrics": self.metrics,
            "per_class": self.per_class,
            "config": self.config,
            "counts": self.counts,
            "timings": self.timings,
            "notes": self.notes,
            "pictures": self.pictures,
            "search": self.search,
        }

    def per_class_csv(self) -> str:
        buf = io.StringIO()
        if self.per_class:
            writer = csv.DictWriter(buf, fieldnames=list(self.per_class[0]))
            writer.writeheader()
            writer.writerows(self.per_class)
        return buf.getvalue()

    def summary(self) -> str:
        """``summary.md``: :meth:`heading` (what was run), then :meth:`results`."""
        return "\n".join([*self.heading(), "", *self.results()]) + "\n"

    def heading(self) -> list[str]:
        """Title and the sentences saying what was run (protocols override this)."""
        cfg = self.config
        return [
            f"# {cfg.get('encoder')} on {self.dataset}",
            "",
            f"In-context retrieval evaluation (Balazevic et al. 2023): k = {cfg.get('k')}, "
            f"β = {cfg.get('temperature')}, memory {cfg.get('memory_size') or 'unbounded'}, "
            f"{cfg.get('aug_epochs')} augmentation epoch(s), input short side {cfg.get('image_size')}, "
            f"index {search_text(cfg.get('index'), self.search)}, layers {layers_text(cfg.get('layers'))}, features {cfg.get('features')}, "
            f"seed {cfg.get('seed')}.",
            f"Prompt: {self.counts.get('prompt_images')} images → {self.counts.get('memory_entries')} memory entries; "
            f"queries scored: {self.counts.get('queries')} at their original resolution.",
        ]

    def results(self) -> list[str]:
        """The metric table, notes, per-class table, seconds per query and pictures."""
        lines = [
            "| metric | value |",
            "|---|---|",
            *(
                f"| {k} | {fmt(v)} |"
                for k, v in self.metrics.items()
                if not isinstance(v, list | dict)
            ),
            "",
        ]
        lines += [f"- {note}" for note in self.notes]
        if self.per_class:
            lines += ["", "| class | IoU | precision | recall |", "|---|---|---|---|"]
            lines += [
                f"| {r['class']} | {fmt(r['iou'])} | {fmt(r['precision'])} | {fmt(r['recall'])} |"
                for r in self.per_class
            ]
        if self.timings:
            per = self.timings
            lines += [
                "",
                "Seconds per query image: "
                + ", ".join(f"{k} {v:.4f}" for k, v in per.items() if k.startswith("per_query_")),
            ]
        if self.pictures:
            lines += ["", "## Pictures (image | ground truth | prediction | confidence)", ""]
            lines += [f"![{p}]({p})" for p in self.pictures]
        return lines

    def write(self, out: Path) -> None:
        out = Path(out)
        write_json(out / "metrics.json", self.to_dict())
        if self.per_class:
            write_text(out / "per_class.csv", self.per_class_csv())
        write_text(out / "summary.md", self.summary())


# the set-up seconds of a protocol: retrieval's memory build; the linear probe's features + training
SETUP_TIMINGS = ("build_memory", "fit")


def compare_reports(reports: dict[str, Report]) -> str:
    """One markdown table comparing methods on the same task (e.g. retrieval vs linear probe).

    Columns: every scalar metric the reports have in common, prompt images, set-up seconds
    (memory build or feature extraction + training) and seconds per query image.
    """
    if not reports:
        raise ValueError("compare_reports needs at least one report")
    tasks = {r.task for r in reports.values()}
    if len(tasks) > 1:
        raise ValueError(f"cannot compare reports of different tasks in one table: {sorted(tasks)}")
    first = next(iter(reports.values()))
    columns = [
        k
        for k, v in first.metrics.items()
        if isinstance(v, int | float) and all(k in r.metrics for r in reports.values())
    ]
    head = ["method", *columns, "prompt images", "set-up s", "s / query"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, report in reports.items():
        setup = next((report.timings[k] for k in SETUP_TIMINGS if k in report.timings), None)
        per_query = sum(v for k, v in report.timings.items() if k.startswith("per_query_"))
        cells = [
            name,
            *(fmt(report.metrics[k]) for k in columns),
            fmt(report.counts.get("prompt_images")),
            fmt(setup, 2),
            fmt(per_query, 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    datasets = sorted({r.dataset for r in reports.values()})
    lines += ["", f"Task: {first.task}; dataset: {', '.join(datasets)}."]
    return "\n".join(lines) + "\n"
