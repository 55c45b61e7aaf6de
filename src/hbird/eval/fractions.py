"""Data efficiency (Balazevic et al. 2023, §4.2): the retrieval protocol on few-shot prompts.

For every fraction (1/128 … 1/1 of the prompt split) and every seed, a seeded subset of
the prompt is drawn with :func:`hbird.data.fewshot.fewshot_indices` (nested across
fractions for one seed), its image names are written to
``<out>/fractions/<fraction>/seed_<seed>/prompt_subset.txt`` so the same images can be
reused, and that folder holds an ordinary resumable :func:`hbird.evaluate` run. Results
are averaged over seeds with their standard deviation (n − 1 denominator) into
``data_efficiency.{json,csv,png}`` and ``summary.md`` at the top of ``out``.

Subsets that come out identical (every seed at 1/1; tiny fractions of tiny datasets) are
evaluated once and their numbers shared. Under ``torchrun`` the runs are spread over the
ranks (:func:`hbird.distributed.spread`), each written by the rank that makes it. The paper runs these fractions with its
low-data settings (``preset="hummingbird_lowdata"``: |M| = 20,480,000, k = 90, β = 0.1,
8 augmentation epochs); nothing is forced here, the settings used are written down.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hbird import distributed
from hbird.data.fewshot import fewshot_indices, parse_fraction, read_subset, write_subset
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.report import Report, fmt, layers_text
from hbird.eval.retrieval import evaluate
from hbird.io.files import write_json, write_text

DEFAULT_FRACTIONS = ("1/128", "1/64", "1/32", "1/16", "1/8", "1/4", "1/2", "1/1")
DEFAULT_SEEDS = (42, 400, 783)
SUBSET_FILE = "prompt_subset.txt"


def fraction_folder(fraction: str) -> str:
    """Folder name of a fraction: ``"1/128"`` → ``"1_128"``, ``"25%"`` → ``"25pct"``."""
    return str(fraction).strip().replace("/", "_").replace("%", "pct")


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The single-number metrics (lists such as loss curves left out; None → NaN)."""
    return {
        k: float(v) if v is not None else math.nan
        for k, v in metrics.items()
        if v is None or isinstance(v, int | float)
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value) of the finite values."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


@dataclass
class FractionResult:
    """One fraction's results over seeds.

    Attributes:
        fraction: as given (``"1/128"``). value: the fraction as a float.
        prompt_images: images in each seed's subset.
        per_seed: ``{seed: {metric: value}}``.
        runs: ``{seed: run folder relative to out}`` (the folder holding the numbers).
    """

    fraction: str
    value: float
    prompt_images: int
    per_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    runs: dict[int, str] = field(default_factory=dict)

    def mean_std(self, metric: str) -> tuple[float, float]:
        return mean_std([m[metric] for m in self.per_seed.values()])


@dataclass
class FractionsReport:
    """A data-efficiency sweep: one :class:`FractionResult` per fraction.

    Attributes:
        task, dataset: as in :class:`Report`. metric: the headline metric (``miou`` / ``rmse``).
        config: the resolved settings. seeds: subset seeds. rows: results per fraction.
        notes: sentences the summary must carry.
    """

    task: str
    dataset: str
    metric: str
    config: dict[str, Any]
    seeds: tuple[int, ...]
    rows: list[FractionResult]
    notes: list[str] = field(default_factory=list)

    @property
    def metric_names(self) -> list[str]:
        names = list(next(iter(self.rows[0].per_seed.values())))
        return [self.metric] + [n for n in names if n != self.metric]

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for row in self.rows:
            stats = {m: row.mean_std(m) for m in self.metric_names}
            rows.append(
                {
                    "fraction": row.fraction,
                    "value": row.value,
                    "prompt_images": row.prompt_images,
                    "mean": {m: s[0] for m, s in stats.items()},
                    "std": {m: s[1] for m, s in stats.items()},
                    "per_seed": {str(k): v for k, v in row.per_seed.items()},
                    "runs": {str(k): v for k, v in row.runs.items()},
                }
            )
        return {
            "task": self.task,
            "dataset": self.dataset,
            "metric": self.metric,
            "config": self.config,
            "seeds": list(self.seeds),
            "std": "sample standard deviation over seeds (n - 1)",
            "fractions": rows,
            "notes": self.notes,
        }

    def csv(self) -> str:
        """One row per (fraction, metric): mean, std and every seed's value."""
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(
            [
                "fraction",
                "fraction_value",
                "prompt_images",
                "metric",
                "mean",
                "std",
                *(f"seed_{s}" for s in self.seeds),
            ]
        )
        for row in self.rows:
            for m in self.metric_names:
                mean, std = row.mean_std(m)
                seeds = [row.per_seed[s][m] for s in self.seeds]
                writer.writerow([row.fraction, row.value, row.prompt_images, m, mean, std, *seeds])
        return buf.getvalue()

    def summary(self) -> str:
        cfg, m = self.config, self.metric
        seeds = ", ".join(str(s) for s in self.seeds)
        lines = [
            f"# Data efficiency: {cfg.get('encoder')} on {self.dataset}",
            "",
            "In-context retrieval (Balazevic et al. 2023) with seeded few-shot subsets of the prompt split "
            f"(hbird.data.fewshot, nested across fractions). Settings: preset {cfg.get('preset') or 'none'}, "
            f"k = {cfg.get('k')}, β = {cfg.get('temperature')}, memory {cfg.get('memory_size') or 'unbounded'}, "
            f"{cfg.get('aug_epochs')} augmentation epoch(s), input short side {cfg.get('image_size')}, "
            f"layers {layers_text(cfg.get('layers'))}, index {cfg.get('index')}, seed {cfg.get('seed')}.",
            f"Mean ± sample standard deviation (n − 1) over subset seeds {seeds}. The paper's §4.2 uses the "
            "low-data preset (hummingbird_lowdata) for these fractions.",
            "",
            f"| fraction | prompt images | {m} (mean ± std) | "
            + " | ".join(f"seed {s}" for s in self.seeds)
            + " |",
            "|---|---|---|" + "---|" * len(self.seeds),
        ]
        for row in self.rows:
            mean, std = row.mean_std(m)
            per_seed = " | ".join(fmt(row.per_seed[s][m]) for s in self.seeds)
            lines.append(
                f"| {row.fraction} | {row.prompt_images} | {fmt(mean)} ± {fmt(std)} | {per_seed} |"
            )
        others = self.metric_names[1:]
        if others:
            lines += [
                "",
                "| fraction | " + " | ".join(others) + " |",
                "|---|" + "---|" * len(others),
            ]
            for row in self.rows:
                cells = (f"{fmt(a)} ± {fmt(b)}" for a, b in map(row.mean_std, others))
                lines.append(f"| {row.fraction} | " + " | ".join(cells) + " |")
        lines += ["", *(f"- {note}" for note in self.notes)]
        lines += ["", "![data efficiency](data_efficiency.png)"]
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> Path:
        from hbird.viz import plot_curves

        means, stds = zip(*(row.mean_std(self.metric) for row in self.rows))
        xs = [row.value for row in self.rows]
        return plot_curves(
            path,
            {
                f"{self.config.get('encoder')} (mean ± std, {len(self.seeds)} seeds)": (
                    xs,
                    means,
                    stds,
                )
            },
            xlabel="fraction of the prompt split",
            ylabel=self.metric,
            title=f"Data efficiency: {self.config.get('encoder')}",
            logx=True,
            fraction_ticks=True,
        )

    def write(self, out: str | Path) -> None:
        out = Path(out)
        write_json(out / "data_efficiency.json", self.to_dict())
        write_text(out / "data_efficiency.csv", self.csv())
        self.plot(out / "data_efficiency.png")
        write_text(out / "summary.md", self.summary())


def _pin_subset(path: Path, names: list[str]) -> None:
    """Write the subset file, or check that an existing one names the same images."""
    if path.is_file():
        if read_subset(path) != names:
            raise InputError(
                f"{path} names other prompt images than this run would use (another dataset or "
                "split?); choose a new --out folder, or delete this one to start over"
            )
        return
    write_subset(path, names)


def evaluate_fractions(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    fractions: Sequence[str | float] = DEFAULT_FRACTIONS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    out: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    protocol: Callable[..., Report] = evaluate,
    **config: Any,
) -> FractionsReport:
    """Run the retrieval protocol on every (fraction, seed) subset of the prompt.

    Args:
        encoder: a registry name or an :class:`Encoder` (built once, shared by all runs).
        dataset: a spec string or ``(prompt, queries)``; opened once.
        fractions: ``"1/128"``, ``0.25``, ``"10%"``...; each becomes a subfolder.
        seeds: subset seeds (the protocol's own ``seed`` setting is kept for every run).
        out: sweep folder; each (fraction, seed) run is resumable, finished ones are reused.
        preset, overrides, **config: :class:`EvalConfig` fields, as for :func:`hbird.evaluate`.
        protocol: the run per subset, called like :func:`hbird.evaluate` (e.g. a
            ``functools.partial`` of :func:`hbird.eval.panoptic.evaluate_panoptic`).
    """
    if not fractions or not seeds:
        raise InputError(
            "give at least one fraction and one seed (e.g. fractions=['1/8'], seeds=[42])"
        )
    if len(set(seeds)) != len(seeds):
        raise InputError(f"seeds must differ, got {list(seeds)}")
    cfg, prompt, queries, description = prepare(encoder, dataset, preset, overrides, config)
    model = load_encoder(encoder, cfg)
    names = prompt.names
    run_config = {k: v for k, v in config.items() if k != "encoder"}  # the model is passed instead
    out = Path(out) if out is not None else None
    plan = []  # (fraction, seed, subset, run folder)
    for fraction in fractions:
        for seed in seeds:
            indices = tuple(fewshot_indices(len(prompt), fraction, seed))
            run = f"fractions/{fraction_folder(str(fraction))}/seed_{seed}"
            if out is not None and distributed.is_main():
                _pin_subset(out / run / SUBSET_FILE, [names[i] for i in indices])
            plan.append((fraction, seed, indices, run))
    first_runs = {}  # subset → the run that evaluates it (identical subsets run once)
    for _, _, indices, run in plan:
        first_runs.setdefault(indices, run)

    def subset_run(indices: tuple[int, ...], run: str):
        def run_it() -> tuple[dict[str, float], str, str, str]:
            report = protocol(
                model,
                (prompt.subset(list(indices)), queries),
                out=out / run if out is not None else None,
                preset=preset,
                overrides=overrides,
                progress=progress,
                **run_config,
            )
            return scalar_metrics(report.metrics), run, report.task, report.headline[0]

        return run_it

    # independent runs: spread over the ranks under torchrun, one by one otherwise
    tasks = [subset_run(indices, run) for indices, run in first_runs.items()]
    done = dict(zip(first_runs, distributed.spread(tasks)))
    task, headline = next(iter(done.values()))[2:]
    rows: dict[str, FractionResult] = {}
    for fraction, seed, indices, _ in plan:
        label = str(fraction)
        row = rows.setdefault(label, FractionResult(label, parse_fraction(fraction), len(indices)))
        row.per_seed[seed], row.runs[seed] = done[indices][:2]
    rows = list(rows.values())
    shared = sum(len(set(r.runs.values())) < len(r.runs) for r in rows)
    notes = [
        {
            "segmentation": "Class ids are predicted directly and scored as they are: no Hungarian "
            "matching; classes absent from both ground truth and predictions are left out of each "
            "run's mean (see the runs' summaries).",
            "panoptic": "Panoptic quality over the classes with TP + FP + FN > 0 (see the runs' "
            "summaries).",
        }.get(task, "Depth metrics over valid pixels (see the runs' summaries)."),
        f"Runs: fractions/<fraction>/seed_<seed>/ (subset in {SUBSET_FILE}, report in summary.md).",
    ]
    if shared:
        notes.append(
            f"{shared} fraction(s) drew the same images for several seeds (e.g. 1/1); such subsets are "
            "evaluated once, so their standard deviation is 0."
        )
    result = FractionsReport(
        task=task,
        dataset=description,
        metric=headline,
        config={**cfg.to_dict(), "preset": preset},
        seeds=tuple(int(s) for s in seeds),
        rows=rows,
        notes=notes,
    )
    if out is not None and distributed.is_main():
        result.write(out)
    return result
