"""Linear-probe baseline (Balazevic et al. 2023, §4.2/4.3): a linear head on frozen patches.

The same encoder, layers and input size as the retrieval protocol; instead of a memory,
a linear layer maps every patch feature to its label:

- segmentation: soft targets = the patch's class fractions (:func:`hbird.memory.labels.pool_labels`),
  cross-entropy with soft targets; patches whose pixels are all ignored are left out;
- depth / regression: the mean of the patch's valid pixels, L1 (default) or L2 loss on
  valid patches only.

Prompt patch features are extracted once, without augmentation, and cached in memory:
``patches × D × 2`` bytes in float16 (default ``cache_dtype``) — e.g. 10,582 VOC images
at 512² with a ViT-S/16 (≈1,000 patches each, D = 384) take ≈8 GB; pass
``cache_dtype="float32"`` to double that for exact features, or a smaller ``image_size``.
Features are standardised with the prompt's per-dimension mean and standard deviation
(regression targets too), an affine change that keeps the head linear and lets one
learning rate suit every encoder. The head starts at zero and is trained with SGD
(momentum 0.9) over shuffled mini-batches of patches for a given number of epochs, with a
cosine, step (×0.1 at 1/2 and 3/4 of the epochs) or constant learning rate; everything is
seeded. Query logits are upsampled bilinearly to each query's original size, then the
argmax is taken, and scored with the same metric objects and :class:`Report` as the
retrieval protocol, so both appear in one table (:func:`compare_reports`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from hbird.data.transforms import resize_for_encoder, resize_label
from hbird.decode import DensePrediction, upsample
from hbird.encoders import Encoder, encode_batches
from hbird.errors import InputError
from hbird.eval.config import EvalConfig, resolve_config
from hbird.eval.report import Report, fmt, layers_text
from hbird.eval.retrieval import (
    load_encoder,
    new_metric,
    open_datasets,
    save_picture,
    scores_from_metric,
)
from hbird.io.files import save_tensors, write_json
from hbird.labelspec import LabelSpec
from hbird.memory.labels import pool_labels
from hbird.metrics import ConfusionMatrix, DepthMetrics

SCHEDULES = ("cosine", "step", "constant")
REGRESSION_LOSSES = ("l1", "l2")


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class ProbeSettings:
    """How the linear head is trained.

    Attributes:
        epochs: passes over the prompt's patches.
        lr: peak SGD learning rate. momentum: SGD momentum. weight_decay: L2 on the weights.
        schedule: ``cosine`` (per step, to 0), ``step`` (×0.1 at 1/2 and 3/4 of the
            epochs) or ``constant``.
        patch_batch_size: patches per SGD step.
        regression_loss: ``l1`` or ``l2`` (depth / regression only).
        cache_dtype: ``float16`` or ``float32`` storage of the cached prompt features.
        seed: seeds the order of the mini-batches.
    """

    epochs: int = 10
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    patch_batch_size: int = 1024
    regression_loss: str = "l1"
    cache_dtype: str = "float16"
    seed: int = 0

    def validate(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
            (self.patch_batch_size >= 1, f"patch_batch_size must be >= 1, got {self.patch_batch_size}"),
            (self.regression_loss in REGRESSION_LOSSES,
             f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}"),
            (self.cache_dtype in ("float16", "float32"),
             f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise InputError(message)


def learning_rate(settings: ProbeSettings, step: int, steps_per_epoch: int) -> float:
    """The learning rate of SGD step ``step`` (0-based) under ``settings.schedule``."""
    total = settings.epochs * steps_per_epoch
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
    if settings.schedule == "step":
        epoch = step // steps_per_epoch
        passed = sum(
            epoch >= m for m in (settings.epochs // 2, (3 * settings.epochs) // 4) if m > 0
        )
        return settings.lr * 0.1**passed
    return settings.lr


# --------------------------------------------------------------------------- features


@dataclass
class PatchTable:
    """Valid prompt patches, ready for training.

    Attributes:
        features: ``(N, D)`` patch features (``cache_dtype``).
        targets: ``(N, C)`` float32: class fractions, or mean values of valid pixels.
        image_index: ``(N,)`` int64, the prompt image each patch comes from.
        seconds: ``(num_images,)`` float64 wall-clock seconds spent on each image
            (loading, resizing, encoding, pooling).
    """

    features: torch.Tensor
    targets: torch.Tensor
    image_index: torch.Tensor
    seconds: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = (self.features, self.targets, self.image_index)
        return sum(t.element_size() * t.numel() for t in tensors)

    def select(self, images: Sequence[int]) -> PatchTable:
        """The patches of the prompt images ``images`` (positions in the prompt)."""
        chosen = torch.as_tensor(list(images), dtype=torch.int64)
        keep = torch.isin(self.image_index, chosen)
        return PatchTable(
            self.features[keep], self.targets[keep], self.image_index[keep], self.seconds[chosen]
        )


def extract_patch_table(
    encoder: Encoder,
    prompt: Any,
    spec: LabelSpec,
    cfg: EvalConfig,
    cache_dtype: str = "float16",
    progress: bool = True,
) -> PatchTable:
    """Encode every prompt image once at ``cfg.image_size`` and pool its labels to patches."""
    dtype = getattr(torch, cache_dtype)
    features, targets, owners, seconds = [], [], [], []
    bar = tqdm(total=len(prompt), desc="prompt features", unit="img", disable=not progress)
    for start in range(0, len(prompt), cfg.batch_size):
        t0 = time.perf_counter()
        samples = [prompt[i] for i in range(start, min(start + cfg.batch_size, len(prompt)))]
        views = [resize_for_encoder(s.image, cfg.image_size, encoder.patch_size) for s in samples]
        feats = encode_batches(
            encoder, views, layers=cfg.layers, batch_size=cfg.batch_size, autocast=cfg.autocast
        )
        for offset, (sample, view, feat) in enumerate(zip(samples, views, feats)):
            label = resize_label(sample.label, tuple(view.shape[-2:]))
            try:
                values, valid = pool_labels(label, encoder.patch_size, spec)
            except InputError as err:
                raise InputError(f"label of prompt image {sample.name}: {err}") from None
            features.append(feat.reshape(-1, feat.shape[-1])[valid].to(dtype))
            targets.append(values[valid])
            owners.append(torch.full((int(valid.sum()),), start + offset, dtype=torch.int64))
        per_image = (time.perf_counter() - t0) / len(samples)
        seconds += [per_image] * len(samples)
        bar.update(len(samples))
    bar.close()
    table = PatchTable(
        torch.cat(features),
        torch.cat(targets),
        torch.cat(owners),
        torch.tensor(seconds, dtype=torch.float64),
    )
    if len(table) == 0:
        raise InputError(
            "the prompt has no labelled patch (every pixel is ignored or invalid); "
            "check the labels and the ignore index / valid range"
        )
    return table


# --------------------------------------------------------------------------- the head


class LinearHead(nn.Module):
    """``(..., D)`` patch features → ``(..., C)`` logits (segmentation) or values (regression).

    ``linear((x - feature_mean) / feature_std) · target_std + target_mean``; the statistics
    are buffers fixed from the prompt (target statistics are 0 / 1 for segmentation).
    """

    def __init__(
        self,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        out_dim: int,
        target_mean: torch.Tensor | None = None,
        target_std: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        dim = feature_mean.shape[0]
        self.linear = nn.Linear(dim, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.register_buffer("feature_mean", feature_mean.to(torch.float32))
        self.register_buffer("feature_std", feature_std.to(torch.float32))
        self.register_buffer(
            "target_mean", torch.zeros(out_dim) if target_mean is None else target_mean.float()
        )
        self.register_buffer(
            "target_std", torch.ones(out_dim) if target_std is None else target_std.float()
        )

    def standardised(self, x: torch.Tensor) -> torch.Tensor:
        """Output in the standardised target space (what the loss sees)."""
        return self.linear((x.to(torch.float32) - self.feature_mean) / self.feature_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.standardised(x) * self.target_std + self.target_mean


def _mean_std(x: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and std of ``(N, D)`` in float64, without a float64 copy of ``x``."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].to(torch.float64)
        total += part.sum(0)
        squares += (part**2).sum(0)
    mean = total / x.shape[0]
    var = (squares / x.shape[0] - mean**2).clamp_min(0)
    return mean, var.sqrt().clamp_min(1e-6)


def _loss(output: torch.Tensor, target: torch.Tensor, spec: LabelSpec, settings: ProbeSettings):
    if spec.is_classification:
        return F.cross_entropy(output, target)  # soft targets: class fractions per patch
    if settings.regression_loss == "l1":
        return F.l1_loss(output, target)
    return F.mse_loss(output, target)


def train_linear_head(
    table: PatchTable, spec: LabelSpec, settings: ProbeSettings, progress: bool = True
) -> tuple[LinearHead, list[float]]:
    """Train a :class:`LinearHead` on ``table``; returns it and the mean loss of every epoch."""
    settings.validate()
    feature_mean, feature_std = _mean_std(table.features)
    targets = table.targets
    target_mean = target_std = None
    if not spec.is_classification:
        target_mean, target_std = _mean_std(targets)
        targets = (targets - target_mean.float()) / target_std.float()
    head = LinearHead(feature_mean, feature_std, spec.value_dim, target_mean, target_std)
    optimiser = torch.optim.SGD(
        head.parameters(),
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )
    generator = torch.Generator().manual_seed(settings.seed)
    n, batch = len(table), settings.patch_batch_size
    steps_per_epoch = math.ceil(n / batch)
    losses, step = [], 0
    bar = tqdm(range(settings.epochs), desc="linear probe", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(n, generator=generator)
        total = 0.0
        for start in range(0, n, batch):
            ids = order[start : start + batch]
            for group in optimiser.param_groups:
                group["lr"] = learning_rate(settings, step, steps_per_epoch)
            loss = _loss(head.standardised(table.features[ids]), targets[ids], spec, settings)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += float(loss.detach()) * len(ids)
            step += 1
        losses.append(total / n)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    return head.eval(), losses


# --------------------------------------------------------------------------- scoring


def predict_linear(
    head: LinearHead, features: torch.Tensor, size: tuple[int, int], spec: LabelSpec
) -> DensePrediction:
    """``(h, w, D)`` query features → a prediction at the query's original ``size``.

    Segmentation: logits upsampled bilinearly, then argmax (confidence = the winning
    class's softmax probability). Regression: values upsampled bilinearly.
    """
    with torch.no_grad():
        patch_out = head(features)  # (h, w, C)
        up = upsample(patch_out, size)  # (C, H, W)
    if spec.is_classification:
        probs = torch.softmax(up, dim=0)
        confidence, labels = probs.max(dim=0)
        return DensePrediction(labels.to(torch.int64), confidence, patch_out)
    values = up[0] if up.shape[0] == 1 else up.permute(1, 2, 0).contiguous()
    return DensePrediction(values, torch.ones(size, dtype=torch.float32), patch_out)


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
        views = [resize_for_encoder(s.image, cfg.image_size, encoder.patch_size) for s in batch]
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


# --------------------------------------------------------------------------- the protocol


class LinearProbeReport(Report):
    """A :class:`Report` whose summary describes the linear probe's settings."""

    def summary(self) -> str:
        cfg, probe = self.config, self.config.get("linear_probe", {})
        base = super().summary()
        body = base[base.index("| metric | value |") :]
        header = [
            f"# Linear probe: {cfg.get('encoder')} on {self.dataset}",
            "",
            f"Linear head on frozen patch features (layers {layers_text(cfg.get('layers'))}, input short side "
            f"{cfg.get('image_size')}), trained with SGD (momentum {probe.get('momentum')}, lr {probe.get('lr')}, "
            f"{probe.get('schedule')} schedule, weight decay {probe.get('weight_decay')}) for {probe.get('epochs')} "
            f"epoch(s) over mini-batches of {probe.get('patch_batch_size')} patches, seed {probe.get('seed')}; "
            "no augmentation. Query logits are upsampled bilinearly before the argmax.",
            f"Prompt: {self.counts.get('prompt_images')} images → {self.counts.get('train_patches')} labelled patches "
            f"({fmt(self.counts.get('cache_bytes', 0) / 2**20, 1)} MiB cached); queries scored: "
            f"{self.counts.get('queries')} at their original resolution.",
            "",
        ]
        return "\n".join(header) + "\n" + body


def _report(
    spec: LabelSpec,
    description: str,
    cfg: EvalConfig,
    settings: ProbeSettings,
    table: PatchTable,
    losses: list[float],
    scores: LinearScores,
    timings: dict[str, float],
) -> LinearProbeReport:
    metrics, per_class, notes = scores_from_metric(scores.metric)
    metrics = {**metrics, "train_loss": losses[-1], "train_loss_per_epoch": losses}
    done = max(scores.queries, 1)
    return LinearProbeReport(
        task=spec.task,
        dataset=description,
        metrics=metrics,
        per_class=per_class,
        config={**cfg.to_dict(), "protocol": "linear", "linear_probe": asdict(settings)},
        counts={
            "prompt_images": int(table.seconds.numel()),
            "train_patches": len(table),
            "cache_bytes": table.nbytes,
            "queries": scores.queries,
        },
        timings={**timings, **{f"per_query_{k}": v / done for k, v in scores.seconds.items()}},
        notes=notes,
        pictures=scores.pictures,
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
            f"features={cfg.features!r} is not available for the linear probe; use features=patch"
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
    report = _report(spec, str(description), cfg, settings, table, losses, scores, timings)
    if out is not None:
        write_json(out / "config.json", {"config": report.config, "dataset": str(description)})
        save_tensors(out / "linear_head.safetensors", head.state_dict())
        report.write(out)
    return report


# --------------------------------------------------------------------------- one table


SETUP_TIMINGS = (
    "build_memory",
    "fit",
)  # retrieval: memory build; linear probe: features + training


def compare_reports(reports: dict[str, Report]) -> str:
    """One markdown table comparing methods on the same task (e.g. retrieval vs linear probe).

    Columns: every scalar metric the reports have in common, prompt images, set-up seconds
    (memory build or feature extraction + training) and seconds per query image.
    """
    if not reports:
        raise ValueError("compare_reports needs at least one report")
    tasks = {r.task for r in reports.values()}
    if len(tasks) > 1:
        raise ValueError(f"cannot compare reports of different tasks in one table: {sorted(tasks)}")
    first = next(iter(reports.values()))
    columns = [
        k for k, v in first.metrics.items()
        if isinstance(v, int | float) and all(k in r.metrics for r in reports.values())
    ]  # fmt: skip
    head = ["method", *columns, "prompt images", "set-up s", "s / query"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, report in reports.items():
        setup = next((report.timings[k] for k in SETUP_TIMINGS if k in report.timings), None)
        per_query = sum(v for k, v in report.timings.items() if k.startswith("per_query_"))
        cells = [
            name,
            *(fmt(report.metrics[k]) for k in columns),
            fmt(report.counts.get("prompt_images")),
            fmt(setup, 2),
            fmt(per_query, 4),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    datasets = sorted({r.dataset for r in reports.values()})
    lines += ["", f"Task: {first.task}; dataset: {', '.join(datasets)}."]
    return "\n".join(lines) + "\n"
