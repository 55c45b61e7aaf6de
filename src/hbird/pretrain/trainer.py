"""One trainer for every objective: AdamW, warm-up + cosine, clipping, EMA, DDP, AMP.

    config = PretrainConfig(objective="hummingbird", arch="vit_small_patch16_224",
                            data="imagefolder:root=/data/imagenet/train", out="runs/hb")
    Trainer(config).fit()

Under ``torchrun`` each process builds the same model (same seed), joins the process
group (gloo on CPU, nccl on GPU) and trains on its slice of every global batch; DDP
averages the gradients. ``batch_size`` is the *global* batch. Mixed precision (bfloat16
autocast) is used on GPU only. Every ``eval_every`` steps the main process measures
retrieval mIoU on the prompt/query sets and logs it with the losses
(``metrics.jsonl`` in the run folder); checkpoints go to ``checkpoint.safetensors``
(the encoder) and ``trainer_state.safetensors`` (for ``resume``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hbird.errors import InputError
from hbird.pretrain import checkpoint as ckpt
from hbird.pretrain.backbone import build_backbone
from hbird.pretrain.data import EpochSampler, ViewDataset, collate, create_image_dataset
from hbird.pretrain.distributed import DistInfo, barrier
from hbird.pretrain.evaluation import RetrievalProbe, probe_from_specs
from hbird.pretrain.loop import (  # noqa: F401 - cpu_threads, format_seconds, process_cores: re-exported
    LoopSettings,
    TrainingLoop,
    cpu_threads,
    format_seconds,
    no_buffer_broadcast,
    process_cores,
)
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective, config_dict, create_objective
from hbird.pretrain.schedule import warmup_cosine


@dataclass(frozen=True)
class PretrainConfig(LoopSettings):
    """Everything that decides a pretraining run.

    Attributes:
        objective: ``hummingbird``, ``hummingbird++``, ``local_global``, ``ibot``, ``co2``.
        objective_options: the objective's own settings (see its ``Config``).
        arch, model_kwargs: the timm ViT or registered encoder (``test_elastic``,
            ``elastic_resnext50``, ``test_axial``, ...) and its non-default options.
        init_weights: optional weights file to start from.
        data: pretraining data spec (see :mod:`hbird.pretrain.data`).
        out: run folder.
        steps: optimizer steps; ``epochs`` overrides it when given.
        batch_size: global batch (split evenly across processes).
        lr, min_lr, weight_decay, warmup_steps: AdamW with linear warm-up
            (default 10% of the steps) and a cosine decay to ``min_lr``.
        clip_grad: max global gradient norm (0 = off).
        crop_size: view side; ``min_scale`` overrides the crops' smallest area fraction.
        view_options: :class:`~hbird.pretrain.augment.ViewSpec` fields set in every view
            of the objective's recipe (e.g. ``{"hue": 0, "grayscale": 0}`` for data whose
            classes differ by hue).
        eval_prompt, eval_query: specs of the online evaluation sets (both or neither);
            evaluated before training, every ``eval_every`` steps and at the end.
        eval_image_size, eval_k, eval_temperature, eval_limit: retrieval settings and
            a cap on the images read from each set.
        log_every, save_every: intervals in steps (0 = only at the end).
        num_workers: data-loader workers per process. seed: everything random.
        device: ``None`` = ``cuda:<local rank>`` if available else ``cpu``.
        amp: bfloat16 autocast on GPU (never on CPU).
        resume: continue from ``out/trainer_state.safetensors``.
    """

    objective: str = "hummingbird"
    objective_options: dict[str, Any] = field(default_factory=dict)
    arch: str = "vit_small_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    data: str | None = None
    out: str = "runs/pretrain"
    steps: int = 1000
    epochs: int | None = None
    batch_size: int = 256
    lr: float = 1e-3
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    clip_grad: float = 1.0
    crop_size: int = 224
    min_scale: float | None = None
    view_options: dict[str, Any] = field(default_factory=dict)
    eval_prompt: str | None = None
    eval_query: str | None = None
    eval_image_size: int = 224
    eval_k: int = 30
    eval_temperature: float = 0.02
    eval_limit: int | None = None
    eval_every: int = 0
    num_workers: int = 4

    def validate(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES.names())}"
            )
        if (self.eval_prompt is None) != (self.eval_query is None):
            raise ValueError("give both eval_prompt and eval_query (or neither)")
        checks = [
            (self.steps >= 1 or self.epochs is not None, "steps must be >= 1"),
            (self.epochs is None or self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 2, "batch_size must be >= 2 (contrastive losses need negatives)"),
            (self.lr > 0, "lr must be > 0"),
            (self.clip_grad >= 0, "clip_grad must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def parameter_groups(objective: Objective, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on weight matrices only, not on biases, norms (1-d) or
    what the objective's ``no_weight_decay()`` names (position embeddings, tokens)."""
    skip = objective.no_weight_decay()
    decay, no_decay = [], []
    for name, p in objective.trainable_parameters():
        if p.ndim < 2 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Trainer(TrainingLoop):
    """Builds the backbone, the objective, the optimizer and (optionally) the data.

    Args:
        config: the run's :class:`PretrainConfig`.
        dist: this process's place (from :func:`hbird.pretrain.distributed.init_distributed`).
        images: an image dataset overriding ``config.data`` (items ``(image, label)``).
        probe: an online evaluation overriding ``config.eval_prompt/eval_query``.
        num_classes: image classes for Hummingbird++ when no dataset is given.
        log: where log lines go (default ``print`` on the main process, nothing elsewhere).
    """

    def __init__(
        self,
        config: PretrainConfig,
        dist: DistInfo | None = None,
        images: Dataset | None = None,
        probe: RetrievalProbe | None = None,
        num_classes: int | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.start(config, dist, log)
        if images is None and config.data is not None:
            images = create_image_dataset(config.data)
        self.images = images
        extra: dict[str, Any] = {}
        if OBJECTIVES.get(config.objective).needs_labels:
            extra["num_classes"] = num_classes or getattr(images, "num_classes", 0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # heads are initialised from the global RNG
            backbone = build_backbone(
                config.arch, config.model_kwargs, config.init_weights, config.seed
            )
            self.objective: Objective = create_objective(
                config.objective, backbone, config.objective_options, **extra
            ).to(self.device)
        step = backbone.size_multiple
        if config.crop_size % step:
            raise InputError(
                f"--crop-size {config.crop_size} is not a multiple of {config.arch}'s output "
                f"stride {step}; use e.g. --crop-size {-(-config.crop_size // step) * step}"
            )
        self.optimizer = torch.optim.AdamW(
            parameter_groups(self.objective, config.weight_decay), lr=config.lr
        )
        self.module = self.objective
        # queues and centres are kept in sync by the objectives: no buffer broadcasts
        self.model: nn.Module = self.wrap(self.objective, **no_buffer_broadcast())
        self.probe = probe
        if probe is None and config.eval_prompt is not None:
            self.probe = probe_from_specs(
                config.eval_prompt,
                config.eval_query,
                config.eval_image_size,
                config.eval_k,
                config.eval_temperature,
                config.eval_limit,
            )
        self.loader, self.sampler = self._build_loader()
        self.total_steps = self._total_steps()
        self.use_amp = config.amp and self.device.type == "cuda"

    # -- setup --------------------------------------------------------------------------
    def _build_loader(self) -> tuple[DataLoader | None, EpochSampler | None]:
        if self.images is None:
            return None, None
        cfg = self.config
        views = self.objective.views(cfg.crop_size, cfg.min_scale).with_options(cfg.view_options)
        dataset = ViewDataset(self.images, views, seed=cfg.seed)
        return self.epoch_loader(dataset, cfg.batch_size, cfg.num_workers, cfg.seed, collate)

    def _total_steps(self) -> int:
        if self.config.epochs is not None:
            if self.sampler is None:
                raise ValueError(
                    "epochs needs data to count the steps per epoch; give steps instead"
                )
            return self.config.epochs * self.sampler.batches_per_epoch
        return self.config.steps

    @property
    def dtype(self) -> torch.dtype:
        """The parameters' dtype; batches are cast to it (autocast handles mixed precision)."""
        return next(self.objective.parameters()).dtype

    @property
    def warmup_steps(self) -> int:
        w = self.config.warmup_steps
        return w if w is not None else self.total_steps // 10

    # -- one step -----------------------------------------------------------------------
    def learning_rate(self, step: int) -> float:
        return warmup_cosine(
            step, self.total_steps, self.config.lr, self.config.min_lr, self.warmup_steps
        )

    def train_step(self, batch: Batch) -> dict[str, float]:
        """One optimizer step on this process's share of the global batch.

        Returns the losses averaged over processes, the learning rate and the gradient norm.
        """
        self.model.train()
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, self.dtype)
        progress = self.step / self.total_steps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            losses = self.model(batch, progress)
        grad_norm = self.optimize(losses["loss"])
        self.objective.after_step((self.step + 1) / self.total_steps)
        self.step += 1
        return {**self.averaged(losses), "lr": lr, "grad_norm": grad_norm}

    def normalize(self, batch: Batch) -> Batch:
        """Views in [0, 1] → the backbone's normalisation (done on the device)."""
        backbone = self.objective.backbone
        return Batch([backbone.normalize(v) for v in batch.views], batch.labels, batch.masks)

    # -- the loop -----------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """Batches from the current step on, across epoch boundaries."""
        if self.loader is None:
            raise InputError("no pretraining data: give --data (or pass images= to Trainer)")
        for batch in self.epoch_batches():
            yield self.normalize(batch.to(self.device, self.dtype))

    @property
    def log_name(self) -> str:
        return self.config.objective

    resume_keys = ("objective", "arch", "model_kwargs")

    @property
    def evaluates(self) -> bool:
        return self.probe is not None

    def evaluate(self) -> dict[str, float]:
        """Retrieval scores of the exported backbone (main process; others wait)."""
        result: dict[str, float] = {}
        if self.probe is not None and self.dist.is_main:
            scores = self.probe(self.objective.export_backbone(), self.device)
            result = {f"eval/{k}": v for k, v in scores.items()}
        barrier()
        return result

    # -- files ------------------------------------------------------------------------
    def save(self) -> None:
        """Write the encoder export and the resumable state (main process only)."""
        if self.dist.is_main:
            meta = {
                "objective": self.config.objective,
                "objective_options": json.dumps(config_dict(self.objective.config), sort_keys=True),
                "step": str(self.step),
                "config": json.dumps(self.config.to_dict(), sort_keys=True, default=str),
            }
            ckpt.save_export(self.objective.export_backbone(), self.out / ckpt.EXPORT_NAME, meta)
            self.save_state()
        barrier()
