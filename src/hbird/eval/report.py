"""What an evaluation leaves in its run folder, and how it reads to a person.

``metrics.json`` (everything numeric), ``per_class.csv``, ``summary.md`` (a table to
paste into a paper), and ``config.json`` (the resolved settings) are written atomically.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hbird.io.files import write_json, write_text


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
    skip = {"kind", "dim", "ntotal", "is_trained", "expected_size", "seed", "train_size",
            "chunk_size", "query_chunk_size", "factory", "keys_dtype"}  # fmt: skip
    params = ", ".join(f"{k} {v}" for k, v in search.items() if k not in skip and v is not None)
    built = search["kind"] + (f" ({params})" if params else "")
    return built if setting == search["kind"] else f"{setting} → {built}"


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
        cfg = self.config
        lines = [
            f"# {cfg.get('encoder')} on {self.dataset}",
            "",
            f"In-context retrieval evaluation (Balazevic et al. 2023): k = {cfg.get('k')}, "
            f"β = {cfg.get('temperature')}, memory {cfg.get('memory_size') or 'unbounded'}, "
            f"{cfg.get('aug_epochs')} augmentation epoch(s), input short side {cfg.get('image_size')}, "
            f"index {search_text(cfg.get('index'), self.search)}, layers {layers_text(cfg.get('layers'))}, features {cfg.get('features')}, "
            f"seed {cfg.get('seed')}.",
            f"Prompt: {self.counts.get('prompt_images')} images → {self.counts.get('memory_entries')} memory entries; "
            f"queries scored: {self.counts.get('queries')} at their original resolution.",
            "",
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
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> None:
        out = Path(out)
        write_json(out / "metrics.json", self.to_dict())
        if self.per_class:
            write_text(out / "per_class.csv", self.per_class_csv())
        write_text(out / "summary.md", self.summary())
