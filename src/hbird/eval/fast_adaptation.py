"""Fast adaptation (Balazevic et al. 2023, §4.3): quality against prompt size and wall-clock.

Retrieval adapts to a task by filling a memory, a linear probe by training. This module
measures both on one dataset:

- **retrieval**: for growing seeded subsets of the prompt split (1/64 … 1/1, one seed),
  the memory is built and the queries scored, recording the memory entries, the build
  seconds, the evaluation seconds and the metric;
- **linear probe** (``compare_linear=True``): the head is trained on the same subsets for
  ``max(linear_epochs)`` epochs, and on the whole prompt for each of ``linear_epochs``;
  its adaptation time is the feature extraction of its images plus the training.

The encoder is built once and warmed up before anything is timed; every point is timed in
one go (no run folders, so no half-reused timings). ``out`` receives
``fast_adaptation.json`` / ``.csv``, ``fast_adaptation.png`` (metric against adaptation
seconds, both methods), ``fast_adaptation_fraction.png`` (metric against the fraction of
the prompt, both methods) and ``summary.md``. Points already in ``fast_adaptation.json``
with the same settings are kept when a sweep is run again, so an interrupted sweep resumes.
"""

from __future__ import annotations

import csv
import io
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hbird.data.fewshot import fewshot_indices, parse_fraction
from hbird.data.transforms import resize_for_encoder
from hbird.encoders import Encoder, encode_batches
from hbird.errors import InputError
from hbird.eval.config import EvalConfig
from hbird.eval.fractions import scalar_metrics
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.linear_probe import (
    PatchTable,
    ProbeSettings,
    extract_patch_table,
    score_linear_head,
    train_linear_head,
)
from hbird.eval.report import fmt, layers_text, scores_from_metric
from hbird.eval.retrieval import evaluate
from hbird.io.files import write_json, write_text
from hbird.labelspec import LabelSpec

DEFAULT_FRACTIONS = ("1/64", "1/32", "1/16", "1/8", "1/4", "1/2", "1/1")
DEFAULT_LINEAR_EPOCHS = (1, 2, 5, 10)


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
            "task": self.task, "dataset": self.dataset, "metric": self.metric, "config": self.config,
            "points": [asdict(p) for p in self.points], "notes": self.notes,
        }  # fmt: skip

    def csv(self) -> str:
        buf = io.StringIO()
        names = list(self.points[0].metrics) if self.points else []
        writer = csv.writer(buf)
        writer.writerow(["method", "fraction", "fraction_value", "prompt_images", "entries", "epochs",
                         "adapt_seconds", "eval_seconds", *names])  # fmt: skip
        for p in self.points:
            writer.writerow([p.method, p.fraction, p.value, p.prompt_images, p.entries, p.epochs,
                             p.adapt_seconds, p.eval_seconds, *(p.metrics.get(n) for n in names)])  # fmt: skip
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
        lines += ["![metric against seconds](fast_adaptation.png)", "",
                  "![metric against prompt fraction](fast_adaptation_fraction.png)"]  # fmt: skip
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
        plot_curves(out / "fast_adaptation_fraction.png", by_fraction, "fraction of the prompt split", m,
                    title, logx=True, fraction_ticks=True)  # fmt: skip

    def write(self, out: str | Path) -> None:
        out = Path(out)
        write_json(out / "fast_adaptation.json", self.to_dict())
        write_text(out / "fast_adaptation.csv", self.csv())
        self.plot(out)
        write_text(out / "summary.md", self.summary())


def _previous_points(out: Path | None, settings: dict[str, Any]) -> dict[str, AdaptationPoint]:
    """Points of an earlier sweep in ``out`` with the same settings (else refuse)."""
    path = out / "fast_adaptation.json" if out is not None else None
    if path is None or not path.is_file():
        return {}
    old = json.loads(path.read_text())
    if old.get("config") != json.loads(json.dumps(settings, default=str)):
        raise InputError(
            f"{path} holds a sweep with other settings; choose a new --out folder, or delete this one to start over"
        )
    return {p.key: p for p in (AdaptationPoint(**d) for d in old["points"])}


def _retrieval_point(
    model: Encoder,
    subset: tuple[Any, Any],
    fraction: str,
    preset: str | None,
    overrides: dict[str, Any] | None,
    progress: bool,
    config: dict[str, Any],
) -> AdaptationPoint:
    """Build the memory from ``subset[0]`` and score ``subset[1]`` (no run folder: honest timings)."""
    report = evaluate(
        model, subset, preset=preset, overrides=overrides, progress=progress, **config
    )
    per_query = sum(v for k, v in report.timings.items() if k.startswith("per_query_"))
    return AdaptationPoint(
        method="retrieval",
        fraction=fraction,
        value=parse_fraction(fraction),
        prompt_images=report.counts["prompt_images"],
        entries=report.counts["memory_entries"],
        epochs=None,
        adapt_seconds=report.timings["build_memory"],
        eval_seconds=per_query * report.counts["queries"],
        metrics=scalar_metrics(report.metrics),
    )


def _linear_point(
    model: Encoder,
    table: PatchTable,
    indices: list[int],
    queries: Any,
    spec: LabelSpec,
    fraction: str,
    probe: ProbeSettings,
    cfg: EvalConfig,
    progress: bool,
) -> AdaptationPoint:
    """Train the head on the patches of prompt images ``indices`` and score the queries."""
    chosen = table.select(indices)
    start = time.perf_counter()
    head, _ = train_linear_head(chosen, spec, probe, progress)
    train_seconds = time.perf_counter() - start
    scores = score_linear_head(head, model, queries, spec, cfg, None, progress)
    metrics, _, _ = scores_from_metric(scores.metric)
    return AdaptationPoint(
        method="linear",
        fraction=fraction,
        value=parse_fraction(fraction),
        prompt_images=len(indices),
        entries=len(chosen),
        epochs=probe.epochs,
        adapt_seconds=float(chosen.seconds.sum())
        + train_seconds,  # features of these images + training
        eval_seconds=sum(scores.seconds.values()),
        metrics=scalar_metrics(metrics),
    )


def _warm_up(encoder: Encoder, queries: Any, cfg: EvalConfig) -> None:
    """One forward pass before anything is timed (first calls pay one-off costs)."""
    view = resize_for_encoder(queries[0].image, cfg.image_size, encoder.patch_size)
    encode_batches(encoder, [view], layers=cfg.layers, autocast=cfg.autocast)


def fast_adaptation(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    fractions: Sequence[str | float] = DEFAULT_FRACTIONS,
    subset_seed: int = 42,
    compare_linear: bool = True,
    linear_epochs: Sequence[int] = DEFAULT_LINEAR_EPOCHS,
    lr: float = 0.01,
    patch_batch_size: int = 1024,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    **config: Any,
) -> FastAdaptationReport:
    """Quality against prompt size and adaptation time, for retrieval and the linear probe.

    Args:
        encoder: a registry name or an :class:`Encoder` (built once, warmed up).
        dataset: a spec string or ``(prompt, queries)``; opened once.
        out: folder for ``fast_adaptation.{json,csv,png}``, ``fast_adaptation_fraction.png``
            and ``summary.md``; finished points there are reused.
        fractions: growing prompt subsets (seeded with ``subset_seed``, nested).
        compare_linear: also train the linear probe (see the module docstring).
        linear_epochs: epoch budgets of the linear probe on the whole prompt; its runs on
            the subsets use the largest.
        lr, patch_batch_size: linear-probe SGD settings (see :func:`linear_probe`).
        preset, overrides, **config: :class:`EvalConfig` fields, as for :func:`hbird.evaluate`.
    """
    if not fractions:
        raise InputError("give at least one fraction, e.g. fractions=['1/8', '1/1']")
    if compare_linear and (not linear_epochs or min(linear_epochs) < 1):
        raise InputError(f"linear_epochs must be positive epoch counts, got {list(linear_epochs)}")
    cfg, prompt, queries, description = prepare(encoder, dataset, preset, overrides, config)
    top = max(linear_epochs) if compare_linear else 1
    probe = ProbeSettings(epochs=top, lr=lr, patch_batch_size=patch_batch_size, seed=cfg.seed)
    probe.validate()
    spec = prompt.label_spec
    model = load_encoder(encoder, cfg)
    _warm_up(model, queries, cfg)
    linear_settings = (
        {k: v for k, v in asdict(probe).items() if k != "epochs"} if compare_linear else None
    )
    settings = {**cfg.to_dict(), "preset": preset, "subset_seed": subset_seed, "dataset": description,
                "linear_probe": linear_settings}  # fmt: skip
    out = Path(out) if out is not None else None
    known = _previous_points(out, settings)
    points: list[AdaptationPoint] = []
    run_config = {k: v for k, v in config.items() if k != "encoder"}  # the model is passed instead

    def keep(point: AdaptationPoint) -> None:
        points.append(point)
        if out is not None:  # save as we go: an interrupted sweep resumes from here
            write_json(
                out / "fast_adaptation.json",
                {"config": settings, "points": [asdict(p) for p in points]},
            )

    subsets = {str(f): fewshot_indices(len(prompt), f, subset_seed) for f in fractions}
    for fraction, indices in subsets.items():
        point = known.get(point_key("retrieval", fraction, None))
        if point is None:
            subset = (prompt.subset(indices), queries)
            point = _retrieval_point(
                model, subset, fraction, preset, overrides, progress, run_config
            )
        keep(point)
    if compare_linear:
        full = next((f for f in subsets if parse_fraction(f) == 1.0), "1/1")
        todo = [(f, top) for f in subsets]
        todo += [(full, e) for e in sorted(set(linear_epochs)) if (full, e) not in todo]
        table = None
        for fraction, epochs in todo:
            point = known.get(point_key("linear", fraction, epochs))
            if point is None:
                if table is None:  # extracted once, only if some point needs it
                    table = extract_patch_table(
                        model, prompt, spec, cfg, probe.cache_dtype, progress
                    )
                indices = subsets.get(fraction, list(range(len(prompt))))
                settings_e = replace(probe, epochs=epochs)
                point = _linear_point(
                    model, table, indices, queries, spec, fraction, settings_e, cfg, progress
                )
            keep(point)

    notes = [
        "Every point is timed in one go in this process, after one warm-up forward pass; the linear probe's "
        "feature extraction is timed per image once and summed over each subset's images.",
        f"Memory entries grow with the prompt until the budget |M| = {cfg.memory_size or 'unbounded'} is reached.",
    ]
    result = FastAdaptationReport(
        spec.task,
        description,
        "miou" if spec.is_classification else "rmse",
        settings,
        points,
        notes,
    )
    if out is not None:
        result.write(out)
    return result
