"""The linear-probe protocol: extract the prompt's patches, train the head, score the queries."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from hbird.data.transforms import resize_for_encoder
from hbird.encoders import Encoder, encode_batches
from hbird.errors import InputError, spell
from hbird.eval.config import EvalConfig, resolve_config
from hbird.eval.linear_probe.head import LinearHead, predict_linear
from hbird.eval.linear_probe.patches import extract_patch_table
from hbird.eval.linear_probe.report import LinearProbeReport, probe_report
from hbird.eval.linear_probe.settings import ProbeSettings
from hbird.eval.linear_probe.training import train_linear_head
from hbird.eval.retrieval import load_encoder, new_metric, open_datasets, save_picture
from hbird.io.files import save_tensors, write_json
from hbird.labelspec import LabelSpec
from hbird.metrics import ConfusionMatrix, DepthMetrics


@dataclass
class LinearScores:
    """What scoring the queries left: the metric, stage seconds, queries, pictures."""

    metric: ConfusionMatrix | DepthMetrics
    seconds: dict[str, float]
    queries: int
    pictures: list[str]


def score_linear_head(
    head: LinearHead,
    encoder: Encoder,
    queries: Any,
    spec: LabelSpec,
    cfg: EvalConfig,
    out: Path | None = None,
    progress: bool = True,
) -> LinearScores:
    """Predict and score the queries (the first ``cfg.max_queries``) at original resolution."""
    metric = new_metric(spec)
    n = len(queries) if cfg.max_queries is None else min(cfg.max_queries, len(queries))
    seconds = {"encode": 0.0, "decode": 0.0, "scoring": 0.0, "loading": 0.0}
    pictures: list[str] = []
    bar = tqdm(total=n, desc="scoring queries", unit="img", disable=not progress)
    for start in range(0, n, cfg.batch_size):
        t0 = time.perf_counter()
        batch = [queries[i] for i in range(start, min(start + cfg.batch_size, n))]
        t1 = time.perf_counter()
        size, patch = cfg.image_size, encoder.patch_size
        views = [resize_for_encoder(s.image, size, patch, cfg.resize) for s in batch]
        feats = encode_batches(
            encoder, views, layers=cfg.layers, batch_size=cfg.batch_size, autocast=cfg.autocast
        )
        t2 = time.perf_counter()
        predictions = [
            predict_linear(head, f, tuple(s.image.shape[-2:]), spec) for s, f in zip(batch, feats)
        ]
        t3 = time.perf_counter()
        for sample, pred in zip(batch, predictions):
            metric.update(pred.labels, sample.label)
        t4 = time.perf_counter()
        for stage, spent in zip(seconds, (t2 - t1, t3 - t2, t4 - t3, t1 - t0)):
            seconds[stage] += spent
        for offset, (sample, pred) in enumerate(zip(batch, predictions)):
            if out is not None and start + offset < cfg.overlays:
                pictures.append(save_picture(out, sample, pred, spec))
        bar.update(len(batch))
    bar.close()
    return LinearScores(metric, seconds, n, pictures)


def linear_probe(
    encoder: str | Encoder | None,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    epochs: int = 10,
    lr: float = 0.01,
    patch_batch_size: int = 1024,
    weight_decay: float = 1e-4,
    schedule: str = "cosine",
    momentum: float = 0.9,
    regression_loss: str = "l1",
    cache_dtype: str = "float16",
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    prompt_indices: Sequence[int] | None = None,
    progress: bool = True,
    **config: Any,
) -> LinearProbeReport:
    """Train a linear head on the prompt split and score the query split.

    Args:
        encoder: a registry name or an :class:`Encoder` (None: ``config['encoder']``).
        dataset: a spec string or ``(prompt, queries)``, as for :func:`hbird.evaluate`.
        out: run folder: ``config.json``, ``metrics.json``, ``per_class.csv``,
            ``summary.md``, ``linear_head.safetensors``, pictures.
        epochs, lr, patch_batch_size, weight_decay, schedule, momentum, regression_loss,
            cache_dtype: see :class:`ProbeSettings` (``patch_batch_size`` is the SGD
            mini-batch in patches; ``batch_size`` stays images per encoder forward).
        preset, overrides, **config: :class:`EvalConfig` fields; the encoder, layers,
            image size, splits, ``seed``, ``batch_size``, ``device``, ``max_queries`` and
            ``overlays`` are used, the retrieval settings (k, β, memory) are not.
        prompt_indices: train on this subset of the prompt.
    """
    if isinstance(encoder, str):
        config["encoder"] = encoder
    elif isinstance(encoder, Encoder):
        config["encoder"] = encoder.name
    cfg = resolve_config(preset, overrides, **config)
    if cfg.features != "patch":
        raise InputError(
            f"{spell('features', cfg.features)} is not available for the linear probe; use "
            f"{spell('features', 'patch')}"
        )
    settings = ProbeSettings(
        epochs=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
        patch_batch_size=patch_batch_size, regression_loss=regression_loss, cache_dtype=cache_dtype, seed=cfg.seed,
    )  # fmt: skip
    settings.validate()
    prompt, queries, description = open_datasets(dataset, cfg)
    if prompt_indices is not None:
        prompt = prompt.subset(prompt_indices)
    spec = prompt.label_spec
    out = Path(out) if out is not None else None
    model = load_encoder(encoder, cfg)

    t0 = time.perf_counter()
    table = extract_patch_table(model, prompt, spec, cfg, settings.cache_dtype, progress)
    t1 = time.perf_counter()
    head, losses = train_linear_head(table, spec, settings, progress)
    t2 = time.perf_counter()
    scores = score_linear_head(head, model, queries, spec, cfg, out, progress)
    timings = {"extract_features": t1 - t0, "train": t2 - t1, "fit": t2 - t0}
    report = probe_report(spec, str(description), cfg, settings, table, losses, scores, timings)
    if out is not None:
        write_json(out / "config.json", {"config": report.config, "dataset": str(description)})
        save_tensors(out / "linear_head.safetensors", head.state_dict())
        report.write(out)
    return report
