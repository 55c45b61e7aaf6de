"""The fast-adaptation curves: one point per (method, fraction, epochs), and their report."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hbird.eval.report import fmt, layers_text
from hbird.io.files import write_json, write_text


@dataclass
class AdaptationPoint:
    """One point of the curves.

    Attributes:
        method: ``retrieval`` or ``linear``.
        fraction: of the prompt split, as given; value: as a float.
        prompt_images: images adapted to.
        entries: memory entries (retrieval) or labelled training patches (linear).
        epochs: training epochs (linear only).
        adapt_seconds: memory build (retrieval) or feature extraction + training (linear).
        eval_seconds: predicting and scoring every query.
        metrics: single-number metrics.
    """

    method: str
    fraction: str
    value: float
    prompt_images: int
    entries: int
    epochs: int | None
    adapt_seconds: float
    eval_seconds: float
    metrics: dict[str, float]

    @property
    def key(self) -> str:
        return point_key(self.method, self.fraction, self.epochs)


def point_key(method: str, fraction: str, epochs: int | None) -> str:
    """How a point is found again when a sweep resumes."""
    return f"{method}:{fraction}:{epochs}"


@dataclass
class FastAdaptationReport:
    """The fast-adaptation curves of one encoder on one dataset."""

    task: str
    dataset: str
    metric: str
    config: dict[str, Any]
    points: list[AdaptationPoint]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "dataset": self.dataset,
            "metric": self.metric,
            "config": self.config,
            "points": [asdict(p) for p in self.points],
            "notes": self.notes,
        }

    def csv(self) -> str:
        buf = io.StringIO()
        names = list(self.points[0].metrics) if self.points else []
        writer = csv.writer(buf)
        writer.writerow(
            [
                "method",
                "fraction",
                "fraction_value",
                "prompt_images",
                "entries",
                "epochs",
                "adapt_seconds",
                "eval_seconds",
                *names,
            ]
        )
        for p in self.points:
            writer.writerow(
                [
                    p.method,
                    p.fraction,
                    p.value,
                    p.prompt_images,
                    p.entries,
                    p.epochs,
                    p.adapt_seconds,
                    p.eval_seconds,
                    *(p.metrics.get(n) for n in names),
                ]
            )
        return buf.getvalue()

    def summary(self) -> str:
        cfg, probe, m = self.config, self.config.get("linear_probe"), self.metric
        lines = [
            f"# Fast adaptation: {cfg.get('encoder')} on {self.dataset}",
            "",
            f"Retrieval (k = {cfg.get('k')}, β = {cfg.get('temperature')}, memory "
            f"{cfg.get('memory_size') or 'unbounded'}, {cfg.get('aug_epochs')} augmentation epoch(s)) on seeded "
            f"subsets of the prompt split (subset seed {cfg.get('subset_seed')}), input short side "
            f"{cfg.get('image_size')}, layers {layers_text(cfg.get('layers'))}.",
        ]
        if probe:
            lines.append(
                f"Linear probe: SGD lr {probe['lr']}, {probe['schedule']} schedule, mini-batches of "
                f"{probe['patch_batch_size']} patches; on each subset for the most epochs, and on the whole "
                "prompt for each epoch budget."
            )
        lines += [
            "Adaptation seconds: building the memory (retrieval) or extracting the prompt features and "
            "training (linear probe); evaluation seconds: predicting and scoring the queries.",
            "",
            f"| method | fraction | prompt images | entries | epochs | adapt s | eval s | {m} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for p in self.points:
            lines.append(
                f"| {p.method} | {p.fraction} | {p.prompt_images} | {p.entries} | {fmt(p.epochs)} | "
                f"{fmt(p.adapt_seconds, 2)} | {fmt(p.eval_seconds, 2)} | {fmt(p.metrics.get(m))} |"
            )
        lines += ["", *(f"- {n}" for n in self.notes), ""]
        lines += [
            "![metric against seconds](fast_adaptation.png)",
            "",
            "![metric against prompt fraction](fast_adaptation_fraction.png)",
        ]
        return "\n".join(lines) + "\n"

    def plot(self, out: str | Path) -> None:
        from hbird.viz import plot_curves

        out, m = Path(out), self.metric
        retrieval = [p for p in self.points if p.method == "retrieval"]
        linear = [p for p in self.points if p.method == "linear"]
        top = max((p.epochs for p in linear), default=None)
        on_subsets = [p for p in linear if p.epochs == top]
        over_epochs = [p for p in linear if p.value == 1.0]

        def xy(points: list[AdaptationPoint], x: str) -> tuple[list[float], list[float], None]:
            return [getattr(p, x) for p in points], [p.metrics[m] for p in points], None

        by_time = {"retrieval (growing memory)": xy(retrieval, "adapt_seconds")}
        by_fraction = {"retrieval": xy(retrieval, "value")}
        if linear:
            by_time["linear probe (growing epochs, whole prompt)"] = xy(
                over_epochs, "adapt_seconds"
            )
            by_fraction[f"linear probe ({top} epochs)"] = xy(on_subsets, "value")
        title = f"Fast adaptation: {self.config.get('encoder')}"
        plot_curves(
            out / "fast_adaptation.png",
            by_time,
            "adaptation wall-clock seconds",
            m,
            title,
            logx=True,
        )
        plot_curves(
            out / "fast_adaptation_fraction.png",
            by_fraction,
            "fraction of the prompt split",
            m,
            title,
            logx=True,
            fraction_ticks=True,
        )

    def write(self, out: str | Path) -> None:
        out = Path(out)
        write_json(out / "fast_adaptation.json", self.to_dict())
        write_text(out / "fast_adaptation.csv", self.csv())
        self.plot(out)
        write_text(out / "summary.md", self.summary())
