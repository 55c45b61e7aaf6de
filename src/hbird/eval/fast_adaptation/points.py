"""Measuring one point of the curves: retrieval on a prompt subset, or a linear head."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from hbird.data.fewshot import parse_fraction
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.config import EvalConfig
from hbird.eval.fast_adaptation.report import AdaptationPoint
from hbird.eval.fractions import scalar_metrics
from hbird.eval.linear_probe import (
    PatchTable,
    ProbeSettings,
    extract_patch_table,
    score_linear_head,
    train_linear_head,
)
from hbird.eval.retrieval import evaluate
from hbird.eval.scoring import scores_from_metric


@dataclass(frozen=True)
class Adaptation:
    """What every point of one sweep shares: the encoder (built once), datasets, settings."""

    model: Encoder
    prompt: Any
    queries: Any
    cfg: EvalConfig
    progress: bool = True


def retrieval_point(shared: Adaptation, fraction: str, indices: list[int]) -> AdaptationPoint:
    """Build the memory from prompt images ``indices``, score the queries (no run folder:
    honest timings)."""
    config = {k: v for k, v in shared.cfg.to_dict().items() if k != "encoder"}
    subset = (shared.prompt.subset(indices), shared.queries)
    report = evaluate(shared.model, subset, progress=shared.progress, **config)
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


def linear_point(
    shared: Adaptation, table: PatchTable, fraction: str, indices: list[int], probe: ProbeSettings
) -> AdaptationPoint:
    """Train the head on the patches of prompt images ``indices`` and score the queries.

    Adaptation seconds: the feature extraction of those images (timed per image in
    ``table``) plus the training.
    """
    spec = shared.prompt.label_spec
    chosen = table.select(indices)
    start = time.perf_counter()
    head, _ = train_linear_head(chosen, spec, probe, shared.progress)
    train_seconds = time.perf_counter() - start
    scores = score_linear_head(
        head, shared.model, shared.queries, spec, shared.cfg, None, shared.progress
    )
    metrics, _, _ = scores_from_metric(scores.metric)
    return AdaptationPoint(
        method="linear",
        fraction=fraction,
        value=parse_fraction(fraction),
        prompt_images=len(indices),
        entries=len(chosen),
        epochs=probe.epochs,
        adapt_seconds=float(chosen.seconds.sum()) + train_seconds,
        eval_seconds=sum(scores.seconds.values()),
        metrics=scalar_metrics(metrics),
    )


def warm_up(shared: Adaptation, probe: ProbeSettings | None) -> None:
    """Run each method once on the first prompt image and the first query, untimed.

    First calls pay one-off costs (lazy imports such as faiss at the first index build,
    kernel and allocator set-up at the first encoder call of a batch shape, the first
    optimiser step) that would otherwise land in the first timed point. A first image
    without a labelled patch cannot warm up; the sweep then goes on without.
    """
    quiet = replace(shared, cfg=replace(shared.cfg, max_queries=1), progress=False)
    try:
        retrieval_point(quiet, "1/1", [0])
        if probe is not None:
            spec = shared.prompt.label_spec
            one = shared.prompt.subset([0])
            table = extract_patch_table(
                shared.model, one, spec, shared.cfg, probe.cache_dtype, False
            )
            linear_point(quiet, table, "1/1", [0], replace(probe, epochs=1))
    except InputError:
        pass
