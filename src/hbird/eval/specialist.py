"""The specialist protocol: ``hbird eval --protocol panoptic-deeplab|max-deeplab``.

A finetuned panoptic specialist (:mod:`hbird.panoptic.specialist`) is trained on the
dataset's train split by :class:`~hbird.panoptic.training.SpecialistTrainer` — or loaded
from a saved ``specialist.safetensors`` — and scored on the val split by panoptic
quality, as the panoptic retrieval protocol scores retrieval (same queries, metric,
report and pictures with instance outlines, :mod:`hbird.eval.panoptic`), so the two
stand side by side. Each query is predicted at its own size, padded (mean pixel) to the
model's size multiple and cropped back.

With a run folder, the training run lives in ``<out>/specialist/`` (resumed when
interrupted; a finished one is reused) and every finished query batch is kept.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from hbird.data.panoptic import PanopticMap, is_panoptic
from hbird.errors import InputError
from hbird.eval.inputs import prepare
from hbird.eval.panoptic import PANOPTIC_DATASETS, PanopticQueries, PanopticReport
from hbird.eval.report import save_picture
from hbird.eval.retrieval import check_run_folder, run_timings, score_run
from hbird.io.files import write_json
from hbird.metrics import PanopticQuality
from hbird.predictor import Timings

SPECIALIST_PROTOCOLS = ("panoptic-deeplab", "max-deeplab")
RUN_FOLDER = "specialist"
FIXED_TRAINING = ("specialist", "specialist_options", "out", "resume", "data")
"""SpecialistConfig fields the protocol sets itself (not ``--train`` keys)."""


class SpecialistPrediction(NamedTuple):
    """One query's panoptic map (``labels``, what the metric scores and the pictures draw)."""

    labels: PanopticMap


@dataclass(frozen=True)
class RunRecord:
    """What decides a specialist run, as :func:`check_run_folder` compares it."""

    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return self.settings


class SpecialistReport(PanopticReport):
    """:class:`PanopticReport` whose heading says which specialist was trained how."""

    def heading(self) -> list[str]:
        cfg = self.config
        train = cfg.get("training") or {}
        how = (
            f"loaded from {cfg['checkpoint']}"
            if cfg.get("checkpoint")
            else f"trained {how_long(train)} on the prompt split (batch "
            f"{train.get('batch_size')}, crop {train.get('crop_size')}, {train.get('optimizer')} "
            f"lr {train.get('lr')}, backbone ×{train.get('backbone_lr_scale')}, backbone weights "
            f"{train.get('init_weights') or 'random'})"
        )
        return [
            f"# {cfg.get('specialist')} on {self.dataset} (panoptic)",
            "",
            f"Finetuned specialist {cfg.get('specialist')} "
            f"(options {cfg.get('specialist_options') or {}}), {how}.",
            f"Train images: {self.counts.get('prompt_images')}; queries scored: "
            f"{self.counts.get('queries')} at their original resolution.",
        ]


def how_long(train: dict[str, Any]) -> str:
    """``"2 epochs"`` or ``"2000 steps"`` of a run's training settings."""
    key = "epochs" if train.get("epochs") is not None else "steps"
    count = train.get(key)
    return f"{count} {key if count != 1 else key[:-1]}"


def training_flags(args: Any, train: dict[str, Any]) -> dict[str, Any]:
    """``--train`` items with ``--epochs`` and ``--lr`` added when given (they must agree
    with a ``--train`` item of the same key)."""
    train = dict(train)
    for key in ("epochs", "lr"):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key in train and train[key] != value:
            raise InputError(
                f"--{key} {value} and --train {key}={train[key]} disagree; give one of them"
            )
        train[key] = value
    return train


def predictor(model: Any, device: torch.device | str, timings: Timings):
    """``predict(images)`` for :func:`score_run`: each ``(3, H, W)`` image padded to the
    model's size multiple, predicted, cropped back."""
    step = model.size_multiple

    @torch.no_grad()
    def predict(images: list[torch.Tensor]) -> list[SpecialistPrediction]:
        out = []
        for image in images:
            height, width = image.shape[-2:]
            pad_h, pad_w = -height % step, -width % step
            with timings.measure("forward"):
                x = model.normalize(image[None].to(device))
                outputs = model(F.pad(x, (0, pad_w, 0, pad_h)))  # 0 = the mean pixel
            with timings.measure("grouping"):
                (panoptic,) = model.predict(outputs, (height + pad_h, width + pad_w))
            out.append(
                SpecialistPrediction(PanopticMap(*(m[:height, :width].cpu() for m in panoptic)))
            )
        return out

    return predict


def training_config(name: str, options: dict[str, Any], train: dict[str, Any], device: str):
    """The :class:`~hbird.panoptic.training.SpecialistConfig` of ``--train`` items."""
    from hbird.panoptic.training import SpecialistConfig, config_fields

    allowed = [f for f in config_fields() if f not in FIXED_TRAINING]
    unknown = sorted(set(train) - set(allowed))
    if unknown:
        raise InputError(
            f"--train does not take {', '.join(unknown)}; it takes {', '.join(allowed)} "
            "(builder options go in --specialist-option)"
        )
    config = SpecialistConfig(
        **{"device": device, **train},
        specialist=name,
        specialist_options=dict(options),
        out="",
    )
    config.validate()
    return config


def train_or_load(config: Any, prompt: Any, out: Path | None, checkpoint: str | None, device: str):
    """The trained specialist: loaded from ``checkpoint``, or trained (resumably in
    ``out/specialist`` with a run folder, in a temporary folder without)."""
    from dataclasses import replace

    from hbird.panoptic.training import SpecialistTrainer, load_specialist
    from hbird.pretrain.checkpoint import STATE_NAME

    if checkpoint is not None:
        return load_specialist(checkpoint, device)
    with tempfile.TemporaryDirectory(prefix="hbird-specialist-") as scratch:
        folder = out / RUN_FOLDER if out is not None else Path(scratch)
        config = replace(config, out=str(folder), resume=(folder / STATE_NAME).is_file())
        return SpecialistTrainer(config, dataset=prompt).fit_model()


def check_label_space(model: Any, spec: Any, thing_classes: Any, description: str) -> None:
    if model.num_classes != int(spec.num_classes) or set(model.thing_classes) != set(thing_classes):
        raise InputError(
            f"the specialist predicts {model.num_classes} classes with things "
            f"{list(model.thing_classes)}, but {description} has {spec.num_classes} with things "
            f"{list(thing_classes)}; give a checkpoint trained on this label space"
        )


def evaluate_specialist(
    specialist: str,
    dataset: str | tuple[Any, Any],
    out: str | Path | None = None,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    train: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    checkpoint: str | Path | None = None,
    progress: bool = True,
    **config: Any,
) -> SpecialistReport:
    """Train (or load) ``specialist`` on the train split, score PQ on the val split.

    Args:
        specialist: ``panoptic-deeplab`` or ``max-deeplab``.
        dataset, out, preset, overrides, **config: as for :func:`hbird.evaluate` (the
            query count, splits, pictures, device, ``weights`` = the backbone's start).
        train: :class:`~hbird.panoptic.training.SpecialistConfig` fields (``steps``,
            ``crop_size``, ``batch_size``, ``lr``...).
        options: the specialist builder's options (``backbone``, ``decoder_width``...).
        checkpoint: a saved ``specialist.safetensors`` to evaluate instead of training.
    """
    if specialist not in SPECIALIST_PROTOCOLS:
        raise InputError(
            f"unknown specialist {specialist!r}; choose one of {', '.join(SPECIALIST_PROTOCOLS)}"
        )
    cfg, prompt, queries, description = prepare(None, dataset, preset, overrides, config)
    if not (is_panoptic(prompt) and is_panoptic(queries)):
        raise InputError(
            f"{description} has no instance labels; the {specialist} protocol needs a "
            f"panoptic dataset: {PANOPTIC_DATASETS}"
        )
    train = {**({"init_weights": cfg.weights} if cfg.weights else {}), **(train or {})}
    training = training_config(specialist, options or {}, train, cfg.device)
    checkpoint = None if checkpoint is None else str(checkpoint)
    settings = {
        "specialist": specialist,
        "specialist_options": training.specialist_options,
        "checkpoint": checkpoint,
        "training": None if checkpoint else {**training.to_dict(), "out": None},
        "max_queries": cfg.max_queries,
        "overlays": cfg.overlays,
        "prompt_split": cfg.prompt_split,
        "query_split": cfg.query_split,
    }
    out = Path(out) if out is not None else None
    if out is not None:
        record = check_run_folder(out, RunRecord(settings), description)
    start = time.perf_counter()
    model = train_or_load(training, prompt, out, checkpoint, cfg.device)
    spec = prompt.label_spec
    check_label_space(model, spec, prompt.thing_classes, description)
    if out is not None:
        write_json(out / "config.json", record)
    train_seconds = time.perf_counter() - start
    timings = Timings()
    metric = PanopticQuality(
        int(spec.num_classes), prompt.thing_classes, spec.ignore_index, spec.class_names
    )
    scored = score_run(
        predictor(model, cfg.device, timings),
        PanopticQueries(queries),
        metric,
        cfg,
        timings,
        out,
        lambda q, p: save_picture(out, q, p, spec),
        train_seconds,
        progress,
    )
    scores = scored.metric.compute()
    seconds = run_timings(scored)
    seconds["fit"] = seconds.pop("build_memory")  # the training (or loading) seconds
    report = SpecialistReport(
        task="panoptic",
        dataset=description,
        metrics={k: (None if v != v else v) for k, v in scores.headline.items()},
        per_class=scores.per_class(),
        config=settings,
        counts={"prompt_images": len(prompt), "queries": scored.done},
        timings=seconds,
        notes=[
            "PQ over classes with TP + FP + FN > 0 (Kirillov et al. 2019): matches at IoU > 0.5, "
            "predicted pixels on void left out of the union, crowd regions never false negatives."
        ],
        pictures=scored.overlays,
    )
    if out is not None:
        report.write(out)
    return report


def run_from_args(args: Any, common: dict[str, Any], print: Any) -> int:
    """``hbird eval --protocol panoptic-deeplab|max-deeplab`` (see :mod:`hbird.cli.eval`)."""
    from hbird.io.options import parse_pairs

    if getattr(args, "encoder", None) is not None:
        raise InputError(
            f"--protocol {args.protocol} trains its own backbone: choose it with "
            "--specialist-option backbone=NAME (and its start with --weights FILE), not --encoder"
        )
    if args.fractions:
        raise InputError(f"--fractions is not supported by --protocol {args.protocol}")
    report = evaluate_specialist(
        args.protocol,
        args.dataset,
        train=training_flags(args, parse_pairs(args.train, "--train", "steps=2000")),
        options=parse_pairs(args.specialist_option, "--specialist-option", "backbone=test_axial"),
        checkpoint=args.specialist_checkpoint,
        **common,
    )
    print(report.summary())
    if args.out is not None:
        print(f"run folder: {args.out}")
    return 0
