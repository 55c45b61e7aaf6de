"""The linear-probe protocol: extract the prompt's patches, train the head, score the queries."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from hbird.data.transforms import resize_for_encoder
from hbird.decode import DensePrediction
from hbird.encoders import Encoder, encode_batches
from hbird.errors import InputError, spell
from hbird.eval.config import EvalConfig
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.linear_probe.head import LinearHead, predict_linear
from hbird.eval.linear_probe.patches import extract_patch_table
from hbird.eval.linear_probe.report import LinearProbeReport, probe_report
from hbird.eval.linear_probe.settings import ProbeSettings
from hbird.eval.linear_probe.training import train_linear_head
from hbird.eval.report import save_picture
from hbird.eval.scoring import Scored, new_metric, score_queries
from hbird.io.files import save_tensors, write_json
from hbird.labelspec import LabelSpec
from hbird.predictor import Timings


def head_predictions(
    head: LinearHead, encoder: Encoder, spec: LabelSpec, cfg: EvalConfig, timings: Timings
) -> Callable[[list[torch.Tensor]], list[DensePrediction]]:
    """``predict`` for :func:`score_queries`: encode at ``cfg.image_size``, apply the head,
    upsample to each image's size; ``encode`` and ``decode`` seconds go to ``timings``."""

    def predict(images: list[torch.Tensor]) -> list[DensePrediction]:
        with timings.measure("encode"):
            size, patch = cfg.image_size, encoder.patch_size
            views = [resize_for_encoder(x, size, patch, cfg.resize) for x in images]
            feats = encode_batches(
                encoder, views, layers=cfg.layers, batch_size=cfg.batch_size, autocast=cfg.autocast
            )
        with timings.measure("decode"):
            return [
                predict_linear(head, f, tuple(x.shape[-2:]), spec) for x, f in zip(images, feats)
            ]

    return predict


def score_linear_head(
    head: LinearHead,
    encoder: Encoder,
    queries: Any,
    spec: LabelSpec,
    cfg: EvalConfig,
    out: Path | None = None,
    progress: bool = True,
) -> Scored:
    """Predict and score the queries (the first ``cfg.max_queries``) at original resolution."""
    timings = Timings()
    return score_queries(
        head_predictions(head, encoder, spec, cfg, timings),
        queries,
        new_metric(spec),
        batch_size=cfg.batch_size,
        limit=cfg.max_queries,
        timings=timings,
        overlay=None if out is None else lambda q, p: save_picture(out, q, p, spec),
        overlays=cfg.overlays,
        progress=progress,
    )


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
        encoder, dataset: as for :func:`hbird.evaluate`.
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
    cfg, prompt, queries, description = prepare(
        encoder, dataset, preset, overrides, config, prompt_indices
    )
    if cfg.features != "patch":
        raise InputError(
            f"{spell('features', cfg.features)} is not available for the linear probe; use "
            f"{spell('features', 'patch')}"
        )
    settings = ProbeSettings(
        epochs=epochs,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        schedule=schedule,
        patch_batch_size=patch_batch_size,
        regression_loss=regression_loss,
        cache_dtype=cache_dtype,
        seed=cfg.seed,
    )
    settings.validate()
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
    report = probe_report(spec, description, cfg, settings, table, losses, scores, timings)
    if out is not None:
        write_json(out / "config.json", {"config": report.config, "dataset": description})
        save_tensors(out / "linear_head.safetensors", head.state_dict())
        report.write(out)
    return report
