"""A fast-adaptation sweep: which points, the record that lets it resume, and the front."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from hbird import distributed
from hbird.data.fewshot import fewshot_indices, parse_fraction
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.fast_adaptation.points import Adaptation, linear_point, retrieval_point, warm_up
from hbird.eval.fast_adaptation.report import AdaptationPoint, FastAdaptationReport, point_key
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.linear_probe import ProbeSettings, extract_patch_table
from hbird.io.files import write_json

DEFAULT_FRACTIONS = ("1/64", "1/32", "1/16", "1/8", "1/4", "1/2", "1/1")
DEFAULT_LINEAR_EPOCHS = (1, 2, 5, 10)


@dataclass(frozen=True)
class AdaptationSweep:
    """Which points a sweep measures.

    Attributes:
        fractions: growing prompt subsets (seeded with ``subset_seed``, nested).
        subset_seed: seed of the subsets.
        linear_epochs: epoch budgets of the linear probe on the whole prompt (its runs on
            the subsets use the largest); empty: retrieval only.
        lr, patch_batch_size: the linear probe's SGD settings (see :class:`ProbeSettings`).
    """

    fractions: Sequence[str | float] = DEFAULT_FRACTIONS
    subset_seed: int = 42
    linear_epochs: Sequence[int] = DEFAULT_LINEAR_EPOCHS
    lr: float = 0.01
    patch_batch_size: int = 1024

    def __post_init__(self) -> None:
        if not self.fractions:
            raise InputError("give at least one fraction, e.g. fractions=['1/8', '1/1']")
        if min(self.linear_epochs, default=1) < 1:
            raise InputError(
                f"linear_epochs must be positive epoch counts, got {list(self.linear_epochs)}"
            )

    def probe(self, seed: int) -> ProbeSettings | None:
        """The linear probe's settings at the largest budget (None: retrieval only)."""
        if not self.linear_epochs:
            return None
        probe = ProbeSettings(
            epochs=max(self.linear_epochs),
            lr=self.lr,
            patch_batch_size=self.patch_batch_size,
            seed=seed,
        )
        probe.validate()
        return probe

    def subsets(self, prompt_size: int) -> dict[str, list[int]]:
        """``{fraction: prompt indices}``, in the order given."""
        return {str(f): fewshot_indices(prompt_size, f, self.subset_seed) for f in self.fractions}

    def linear_runs(self, fractions: list[str]) -> list[tuple[str, int]]:
        """``(fraction, epochs)``: every subset at the largest budget, then the whole prompt
        at each other budget."""
        full = next((f for f in fractions if parse_fraction(f) == 1.0), "1/1")
        runs = [(f, max(self.linear_epochs)) for f in fractions]
        return runs + [(full, e) for e in sorted(set(self.linear_epochs)) if (full, e) not in runs]


class SweepRecord:
    """``fast_adaptation.json`` of a sweep: points of an earlier run with the same settings
    are reused, and the list is saved after every new point, so an interrupted sweep resumes."""

    def __init__(self, out: Path | None, settings: dict[str, Any]) -> None:
        self.path = out / "fast_adaptation.json" if out is not None else None
        self.settings = settings
        self.points: list[AdaptationPoint] = []
        self.known: dict[str, AdaptationPoint] = {}
        if self.path is not None and self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("config") != json.loads(json.dumps(settings, default=str)):
                raise InputError(
                    f"{self.path} holds a sweep with other settings; choose a new --out folder, "
                    "or delete this one to start over"
                )
            self.known = {p.key: p for p in (AdaptationPoint(**d) for d in old["points"])}

    def get(self, key: str) -> AdaptationPoint | None:
        """The point ``key`` (see :func:`point_key`) of the earlier run, if it has one."""
        return self.known.get(key)

    def keep(self, point: AdaptationPoint) -> None:
        """Add ``point`` and save the list."""
        self.points.append(point)
        if self.path is not None and distributed.is_main():
            points = [asdict(p) for p in self.points]
            write_json(self.path, {"config": self.settings, "points": points})


def run_sweep(shared: Adaptation, sweep: AdaptationSweep, record: SweepRecord) -> None:
    """Measure every point of ``sweep`` that ``record`` does not hold yet, in order (under
    ``torchrun`` the points to measure are spread over the ranks, each timed on its own)."""
    subsets = sweep.subsets(len(shared.prompt))
    jobs = [
        (point_key("retrieval", f, None), partial(retrieval_point, shared, f, indices))
        for f, indices in subsets.items()
    ]
    probe = sweep.probe(shared.cfg.seed)
    tables = []  # the prompt's patches, extracted once, only if some point needs them

    def linear(fraction: str, epochs: int) -> AdaptationPoint:
        if not tables:
            spec, cfg = shared.prompt.label_spec, shared.cfg
            tables.append(
                extract_patch_table(
                    shared.model, shared.prompt, spec, cfg, probe.cache_dtype, shared.progress
                )
            )
        indices = subsets.get(fraction, list(range(len(shared.prompt))))
        return linear_point(shared, tables[0], fraction, indices, replace(probe, epochs=epochs))

    if probe is not None:
        jobs += [
            (point_key("linear", f, e), partial(linear, f, e))
            for f, e in sweep.linear_runs(list(subsets))
        ]
    todo = [job for key, job in jobs if record.get(key) is None]
    measured = distributed.spread(todo)
    for key, _ in jobs:
        record.keep(record.get(key) or next(measured))


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
        fractions, subset_seed, linear_epochs, lr, patch_batch_size: see
            :class:`AdaptationSweep`.
        compare_linear: also train the linear probe (see the module docstring).
        preset, overrides, **config: :class:`EvalConfig` fields, as for :func:`hbird.evaluate`.
    """
    epochs = tuple(linear_epochs) if compare_linear else ()
    if compare_linear and not epochs:
        raise InputError(
            "compare_linear needs at least one epoch budget, e.g. linear_epochs=(1, 10); "
            "or pass compare_linear=False"
        )
    sweep = AdaptationSweep(tuple(fractions), subset_seed, epochs, lr, patch_batch_size)
    cfg, prompt, queries, description = prepare(encoder, dataset, preset, overrides, config)
    probe = sweep.probe(cfg.seed)
    shared = Adaptation(load_encoder(encoder, cfg), prompt, queries, cfg, progress)
    warm_up(shared, probe)
    linear = {k: v for k, v in asdict(probe).items() if k != "epochs"} if probe else None
    sweep_settings = {"preset": preset, "subset_seed": subset_seed, "dataset": description}
    settings = {**cfg.to_dict(), **sweep_settings, "linear_probe": linear}
    record = SweepRecord(Path(out) if out is not None else None, settings)
    run_sweep(shared, sweep, record)
    notes = [
        "Every point is timed in one go in this process, after an untimed warm-up run of each method "
        "on one prompt image and one query; the linear probe's feature extraction is timed per image "
        "once and summed over each subset's images.",
        f"Memory entries grow with the prompt until the budget |M| = {cfg.memory_size or 'unbounded'} is reached.",
    ]
    spec = prompt.label_spec
    metric = "miou" if spec.is_classification else "rmse"
    report = FastAdaptationReport(spec.task, description, metric, settings, record.points, notes)
    if out is not None and distributed.is_main():
        report.write(out)
    return report
