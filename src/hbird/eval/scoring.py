"""One scoring loop for every protocol: predictions in, a metric's state out, resumable.

The retrieval protocol, the linear probe, fast adaptation's points, the pretraining
probe and the demo all score through :func:`score_queries`. What it needs:

- ``predict(images)``: a list of ``(3, H, W)`` float images → one prediction per image at
  that image's own size, either the tensor the metric scores or an object carrying it
  as ``.labels`` (:class:`~hbird.decode.DensePrediction`, which also has the confidence
  an overlay draws);
- ``queries``: ``len(queries)`` and ``queries[i]`` → an item with ``.image`` and
  ``.label`` (a :class:`hbird.data.Sample`; :class:`Query` for tensors in memory);
- ``metric``: any :class:`hbird.metrics.StreamingMetric`, i.e. ``update(prediction,
  target)``, ``state_dict()`` and ``load_state_dict(state)``. :class:`ConfusionMatrix`
  and :class:`DepthMetrics` are two; a panoptic metric with the same three methods
  plugs in unchanged.

With a ``progress_file``, the loop writes after every batch, atomically
(:func:`hbird.io.files.write_json`): the metric's state, how many queries are done, the
seconds per stage, the overlays drawn and the caller's ``extra`` (e.g. the seconds the
memory took to build). Run again with the same file, it loads all of that and goes on
after the last finished batch. Metrics add up image by image in the same order, so an
interrupted and resumed run gives the numbers of an uninterrupted one.

Under a process group (``torchrun``) each step gives every rank its own ``batch_size``
queries; the ranks' metric states are summed (:func:`hbird.distributed.sum_metric_state`)
and only rank 0 writes the progress file and the overlays. The file records global
counts, so a run resumes with any number of ranks.

:func:`new_metric` is the metric the protocols score a label spec with, and
:func:`scores_from_metric` how its scores read in a :class:`~hbird.eval.report.Report`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from tqdm.auto import tqdm

from hbird import distributed
from hbird.data.prefetch import prefetched
from hbird.errors import InputError
from hbird.io.files import write_json
from hbird.labelspec import LabelSpec
from hbird.metrics import ConfusionMatrix, DepthMetrics, StreamingMetric
from hbird.predictor import Timings

M = TypeVar("M", bound=StreamingMetric)


@dataclass(frozen=True, eq=False)
class Query:
    """A query held in memory: ``image`` ``(3, H, W)`` in [0, 1], its ``label``, a name."""

    image: torch.Tensor
    label: torch.Tensor
    name: str = ""


def in_memory(images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor]) -> list[Query]:
    """A query source from parallel lists of images and labels."""
    return [
        Query(image, label, f"query_{i:04d}")
        for i, (image, label) in enumerate(zip(images, labels))
    ]


@dataclass
class Scored(Generic[M]):
    """What scoring left.

    Attributes:
        metric: the metric with every scored query in it.
        done: queries scored (over all runs, when resumed).
        seconds: seconds per stage summed over the queries: ``loading`` and ``scoring``
            from the loop, and whatever ``predict`` measured into the same
            :class:`~hbird.predictor.Timings` (``encode``, ``search``, ``decode``...).
        overlays: the overlay files drawn, as ``overlay`` returned them.
        extra: the caller's values kept for a resumed run.
    """

    metric: M
    done: int
    seconds: dict[str, float]
    overlays: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors → nested lists (float64 and int64 values survive JSON exactly)."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def score_queries(
    predict: Callable[[list[torch.Tensor]], Sequence[Any]],
    queries: Sequence[Any],
    metric: M,
    *,
    batch_size: int,
    limit: int | None = None,
    timings: Timings | None = None,
    overlay: Callable[[Any, Any], str] | None = None,
    overlays: int = 0,
    progress_file: Path | None = None,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
    workers: int = 0,
) -> Scored[M]:
    """Predict the queries batch by batch and add each prediction to ``metric``.

    Args:
        predict, queries, metric: see the module docstring.
        batch_size: queries per call of ``predict``.
        limit: score only the first ``limit`` queries (None: all).
        timings: where ``predict`` measures its own stages; the loop adds ``loading``
            (reading the queries) and ``scoring`` (``metric.update``) to it.
        overlay: ``overlay(query, prediction) -> file`` draws one picture;
            it is called for the first ``overlays`` queries.
        progress_file: JSON file saved after every batch; if it exists, the run resumes
            from it (the metric must be built with the same arguments).
        extra: JSON-able values the caller needs again when resuming; a resumed run
            returns the ones saved by the first run.
        progress: show a progress bar.
        workers: worker processes reading the next queries while ``predict`` runs
            (:func:`hbird.data.prefetch.prefetched`; the same queries, in order).
    """
    timings = timings if timings is not None else Timings()
    total = len(queries) if limit is None else min(limit, len(queries))
    world, me = distributed.world_size(), distributed.rank()
    done, drawn, extra = 0, [], dict(extra or {})
    if progress_file is not None and progress_file.is_file():
        saved = json.loads(progress_file.read_text())
        missing = {"done", "metric", "seconds", "overlays", "extra"} - set(saved)
        if missing:
            raise InputError(
                f"{progress_file} lacks {', '.join(sorted(missing))} (written by another hbird "
                "version?); delete it to score the queries again"
            )
        if me == 0:  # the saved sums are counted once, on rank 0
            metric.load_state_dict(saved["metric"])
            timings.seconds = saved["seconds"]
        done, drawn, extra = saved["done"], saved["overlays"], saved["extra"]
    show = progress and me == 0
    bar = tqdm(total=total, initial=done, desc="scoring queries", unit="img", disable=not show)
    # a step scores world × batch_size queries, batch_size per rank, in query order
    steps = [(start, min(start + batch_size * world, total))
             for start in range(done, total, batch_size * world)]  # fmt: skip
    mine = [range(min(a + me * batch_size, b), min(a + (me + 1) * batch_size, b)) for a, b in steps]
    loaded = prefetched(queries.__getitem__, mine, workers)
    for (_, stop), rows in zip(steps, mine):
        with timings.measure("loading"):  # with workers: the wait for a batch read ahead
            batch = next(loaded)
        predictions = predict([q.image for q in batch])  # every rank calls it, even with none
        with timings.measure("scoring"):
            for query, prediction in zip(batch, predictions):
                metric.update(getattr(prediction, "labels", prediction), query.label)
        if overlay is not None and done < overlays:
            drawn += _draw(overlay, queries, zip(rows, batch, predictions), overlays)
        bar.update(stop - done)
        done = stop
        if progress_file is not None:
            state = {"done": done, "metric": _jsonable(distributed.sum_metric_state(metric))}
            seconds = distributed.sum_seconds(timings.seconds)
            if me == 0:
                write_json(
                    progress_file, {**state, "seconds": seconds, "overlays": drawn, "extra": extra}
                )
    bar.close()
    if world > 1:  # every rank returns the sums over all of them
        metric.load_state_dict(distributed.sum_metric_state(metric))
        timings.seconds = distributed.sum_seconds(timings.seconds)
    return Scored(metric, done, dict(timings.seconds), drawn, extra)


def _draw(
    overlay: Callable[[Any, Any], str],
    queries: Sequence[Any],
    scored: Iterable[tuple[int, Any, Any]],
    overlays: int,
) -> list[str]:
    """Draw the first ``overlays`` queries of a step; several ranks send theirs to rank 0,
    which alone writes (and returns) the files."""
    wanted = [(i, q, p) for i, q, p in scored if i < overlays]
    if distributed.world_size() == 1:
        return [overlay(q, p) for _, q, p in wanted]
    sent = distributed.all_gather_object([(i, p) for i, _, p in wanted])
    if not distributed.is_main():
        return []
    return [overlay(queries[i], p) for i, p in sorted(x for part in sent for x in part)]


def new_metric(spec: LabelSpec) -> ConfusionMatrix | DepthMetrics:
    """The metric the protocols score ``spec``'s labels with (depth range from the spec)."""
    if spec.is_classification:
        return ConfusionMatrix(
            int(spec.num_classes), ignore_index=spec.ignore_index, class_names=spec.class_names
        )
    low = spec.min_value if math.isfinite(spec.min_value) and spec.min_value > 0 else 1e-3
    high = spec.max_value if math.isfinite(spec.max_value) else 10.0
    return DepthMetrics(min_depth=low, max_depth=high)


def scores_from_metric(
    metric: ConfusionMatrix | DepthMetrics,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """A metric's scores as a report has them: headline metrics, per-class rows, notes."""
    scores = metric.compute()
    if isinstance(metric, DepthMetrics):
        d = scores.to_dict()
        return (
            {
                k: d[k]
                for k in (
                    "rmse",
                    "abs_rel",
                    "log10",
                    "delta1",
                    "delta2",
                    "delta3",
                    "sq_rel",
                    "rmse_log",
                )
            },
            [],
            [
                f"Depth metrics over valid pixels ({metric.min_depth:g}–{metric.max_depth:g} m), "
                f"reduction '{scores.reduction}'; {scores.num_images} images, {scores.skipped_images} without valid depth."
            ],
        )
    names = scores.class_names or tuple(str(i) for i in range(len(scores.iou)))
    per_class = [
        {"class": n, "iou": i, "precision": p, "recall": r}
        for n, i, p, r in zip(names, scores.iou, scores.precision, scores.recall)
    ]
    notes = ["Class ids are predicted directly and scored as they are: no Hungarian matching."]
    if scores.absent_classes:
        absent = ", ".join(names[c] for c in scores.absent_classes)
        notes.append(
            f"{len(scores.absent_classes)} class(es) absent from both ground truth and predictions were left out "
            f"of the mean: {absent}."
        )
    metrics = {
        "miou": scores.miou,
        "pixel_accuracy": scores.pixel_accuracy,
        "mean_class_accuracy": scores.mean_class_accuracy,
    }
    return metrics, per_class, notes
