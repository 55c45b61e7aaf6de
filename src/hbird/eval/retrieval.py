"""The retrieval protocol (Balazevic et al. 2023, §4 and appendix A).

Prompt = a dataset's training split, queries = its validation split. The prompt is
encoded into a memory bank (sampled, augmented), each query is predicted by eq. 1 and
scored at its original resolution with a streaming metric. With a run folder, the bank
and every finished query batch are kept, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird.data.datasets import create_dataset
from hbird.data.pairs import DatasetPairs
from hbird.encoders import Encoder, create_encoder
from hbird.encoders.normalization import with_normalize
from hbird.errors import InputError
from hbird.eval.config import EvalConfig, resolve_config
from hbird.eval.report import Report
from hbird.io.files import write_json
from hbird.io.options import parse_spec
from hbird.labelspec import LabelSpec
from hbird.metrics import ConfusionMatrix, DepthMetrics
from hbird.predictor import InContextPredictor

# (prompt split, query split) per dataset, as in the paper's protocol
DEFAULT_SPLITS = {
    "voc": ("trainaug", "val"),
    "ade20k": ("train", "val"),
    "cityscapes": ("train", "val"),
    "cocostuff": ("train", "val"),
    "nyuv2": ("train", "test"),
    "folder": ("train", "val"),
}
# settings that may change between a run and its resumption without changing its numbers
RESUMABLE_CHANGES = {"overlays", "device", "batch_size", "max_queries"}


def open_datasets(dataset: Any, cfg: EvalConfig) -> tuple[Any, Any, str]:
    """``(prompt dataset, query dataset, description)`` from a spec string or a pair."""
    if isinstance(dataset, tuple | list):
        prompt, queries = dataset
        return prompt, queries, getattr(queries, "description", type(queries).__name__)
    name, fields = parse_spec(dataset)
    default_prompt, default_query = DEFAULT_SPLITS.get(name, ("train", "val"))
    query_split = cfg.query_split or fields.get("split") or default_query
    prompt_split = cfg.prompt_split or default_prompt
    try:
        prompt = create_dataset(dataset, split=prompt_split)
    except InputError:
        if name != "voc" or cfg.prompt_split is not None:
            raise
        prompt = create_dataset(
            dataset, split="train"
        )  # no SegmentationClassAug: the 1,464 train images
    queries = create_dataset(dataset, split=query_split)
    return prompt, queries, dataset


def load_encoder(encoder: str | Encoder | None, cfg: EvalConfig) -> Encoder:
    """The frozen encoder an evaluation uses: ``encoder`` itself, or built from ``cfg``."""
    if isinstance(encoder, Encoder):
        return with_normalize(encoder.to(cfg.device).eval(), cfg.normalize)
    return create_encoder(
        encoder or cfg.encoder,
        weights=cfg.weights,
        pretrained=cfg.pretrained and cfg.weights is None,
        device=cfg.device,
        normalize=cfg.normalize,
    )


def new_metric(spec: LabelSpec) -> ConfusionMatrix | DepthMetrics:
    if spec.is_classification:
        return ConfusionMatrix(
            int(spec.num_classes), ignore_index=spec.ignore_index, class_names=spec.class_names
        )
    low = spec.min_value if math.isfinite(spec.min_value) and spec.min_value > 0 else 1e-3
    high = spec.max_value if math.isfinite(spec.max_value) else 10.0
    return DepthMetrics(min_depth=low, max_depth=high)


def _check_run_folder(out: Path, cfg: EvalConfig, dataset: str) -> None:
    record = {"config": cfg.to_dict(), "dataset": dataset}
    path = out / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(
            k for k in set(old["config"]) | set(record["config"])
            if k not in RESUMABLE_CHANGES and old["config"].get(k) != record["config"].get(k)
        )  # fmt: skip
        if changed or old.get("dataset") != dataset:
            raise InputError(
                f"{out} holds a run with other settings ({', '.join(changed) or 'dataset'} differ); "
                "choose a new --out folder, or delete this one to start over"
            )
    write_json(path, record)


def _predictor(
    cfg: EvalConfig, encoder: str | Encoder | None, prompt: Any, out: Path | None, progress: bool
):
    kwargs = cfg.predictor_kwargs()
    if encoder is not None:
        kwargs["encoder"] = encoder
    predictor = InContextPredictor(**kwargs, progress=progress)
    if out is None:
        return predictor.fit_dataset(prompt)
    bank = out / "bank"
    if not (bank / "manifest.json").is_file():
        predictor.build_bank(DatasetPairs(prompt), prompt.label_spec, bank)
        kwargs["encoder"] = predictor.encoder_  # built once
    loaded = InContextPredictor.load(
        bank,
        encoder=kwargs["encoder"],
        device=cfg.device,
        progress=progress,
        index_params=cfg.index_params,
        batch_size=cfg.batch_size,
    )
    loaded.timings = predictor.timings
    return loaded


def scores_from_metric(
    metric: ConfusionMatrix | DepthMetrics,
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
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


def evaluate(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    prompt_indices: list[int] | None = None,
    progress: bool = True,
    **config: Any,
) -> Report:
    """Run the retrieval protocol; write the run folder if ``out`` is given.

    Args:
        encoder: a registry name or an :class:`Encoder` (None: ``config['encoder']``).
        dataset: a spec string (``"voc:root=/data/VOC2012"``) or ``(prompt, queries)``.
        out: run folder (config, bank, progress, metrics, summary, pictures).
        preset: a preset name (``hummingbird``, ``hummingbird_lowdata``) or YAML path.
        overrides, **config: :class:`EvalConfig` fields (``k=50``...).
        prompt_indices: evaluate with this subset of the prompt (few-shot fractions).
    """
    if isinstance(encoder, str):
        config["encoder"] = encoder
    elif isinstance(encoder, Encoder):
        config["encoder"] = encoder.name
    cfg = resolve_config(preset, overrides, **config)
    prompt, queries, description = open_datasets(dataset, cfg)
    if prompt_indices is not None:
        prompt = prompt.subset(prompt_indices)
    out = Path(out) if out is not None else None
    if out is not None:
        _check_run_folder(
            out, cfg, description if isinstance(description, str) else str(description)
        )
    start = time.perf_counter()
    predictor = _predictor(
        cfg, encoder if isinstance(encoder, Encoder) else None, prompt, out, progress
    )
    build_seconds = time.perf_counter() - start
    predictor.timings.reset()
    spec = predictor.label_spec_
    metric = new_metric(spec)
    n_queries = len(queries) if cfg.max_queries is None else min(cfg.max_queries, len(queries))
    done, scoring, loading, pictures = 0, 0.0, 0.0, []
    progress_file = out / "progress.json" if out is not None else None
    if progress_file is not None and progress_file.is_file():
        state = json.loads(progress_file.read_text())
        metric.load_state_dict(state["metric"])
        done, scoring, loading = state["done"], state["scoring"], state["loading"]
        build_seconds = state["build_memory"]  # the first run's build, not this run's bank loading
        predictor.timings.seconds = state["timings"]
        pictures = state["pictures"]
    bar = tqdm(
        total=n_queries, initial=done, desc="scoring queries", unit="img", disable=not progress
    )
    predictor.progress = False
    while done < n_queries:
        t0 = time.perf_counter()
        batch = [queries[i] for i in range(done, min(done + cfg.batch_size, n_queries))]
        loading += time.perf_counter() - t0
        predictions = predictor.predict_dense([s.image for s in batch])
        t0 = time.perf_counter()
        for sample, pred in zip(batch, predictions):
            metric.update(pred.labels, sample.label)
        scoring += time.perf_counter() - t0
        for offset, (sample, pred) in enumerate(zip(batch, predictions)):
            if out is not None and done + offset < cfg.overlays:
                pictures.append(save_picture(out, sample, pred, spec))
        done += len(batch)
        bar.update(len(batch))
        if progress_file is not None:
            write_json(progress_file, {
                "done": done, "metric": _jsonable(metric.state_dict()), "scoring": scoring, "loading": loading, "build_memory": build_seconds,
                "timings": predictor.timings.seconds, "pictures": pictures,
            })  # fmt: skip
    bar.close()
    metrics, per_class, notes = scores_from_metric(metric)
    seconds = dict(predictor.timings.seconds, scoring=scoring, loading=loading)
    timings = {
        "build_memory": build_seconds,
        **{f"per_query_{k}": v / max(done, 1) for k, v in seconds.items()},
    }
    report = Report(
        task=spec.task,
        dataset=str(description),
        metrics=metrics,
        per_class=per_class,
        config=cfg.to_dict(),
        counts={
            "prompt_images": len(prompt),
            "memory_entries": len(predictor.bank_),
            "queries": done,
        },
        timings=timings,
        notes=notes,
        pictures=pictures,
        search=predictor.index_.describe(),
    )
    if out is not None:
        report.write(out)
    return report


def _jsonable(state: dict[str, Any]) -> dict[str, Any]:
    """Tensors → nested lists (float64 values survive JSON exactly)."""
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in state.items()}


def save_picture(out: Path, sample: Any, pred: Any, spec: LabelSpec) -> str:
    from hbird.viz import save_prediction_panel

    path = out / "pictures" / f"{sample.name}.png"
    save_prediction_panel(
        path, sample.image, pred.labels, sample.label,
        kind="segmentation" if spec.is_classification else "depth",
        confidence=pred.confidence, ignore_index=spec.ignore_index, class_names=spec.class_names,
    )  # fmt: skip
    return path.relative_to(out).as_posix()
