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

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from hbird.errors import InputError
from hbird.io.files import write_json
from hbird.pretrain import checkpoint as ckpt
from hbird.pretrain.backbone import build_backbone
from hbird.pretrain.data import EpochSampler, ViewDataset, collate, create_image_dataset
from hbird.pretrain.distributed import DistInfo, barrier, full_precision, mean_over_processes
from hbird.pretrain.evaluation import RetrievalProbe, probe_from_specs
from hbird.pretrain.objective import OBJECTIVES, Batch, Objective, config_dict, create_objective
from hbird.pretrain.schedule import warmup_cosine


@dataclass(frozen=True)
class PretrainConfig:
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
    log_every: int = 10
    save_every: int = 0
    num_workers: int = 4
    seed: int = 0
    device: str | None = None
    amp: bool = True
    resume: bool = False

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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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


def _silent(_: str) -> None:
    """Log sink of the non-main processes."""


def _no_buffer_broadcast() -> dict[str, bool]:
    """DDP's option to skip re-broadcasting buffers every forward (renamed in newer torch)."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    return (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in params
        else {"broadcast_buffers": False}
    )


def process_cores() -> int:
    """CPU cores this process may keep busy: the cores it may run on, divided among the
    ``LOCAL_WORLD_SIZE`` processes ``torchrun`` starts on the machine (0 if fewer than them)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (cores or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads lowered to ``count`` (at least 1) inside the block, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(before, count)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def format_seconds(seconds: float) -> str:
    """``75 → "1m15s"``, ``3725 → "1h02m"``, ``9 → "9s"``: a duration to read at a glance."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Trainer:
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
        self.config = config
        self.dist = dist or DistInfo(device=torch.device(config.device or "cpu"))
        self.device = self.dist.device
        self.out = Path(config.out)
        self.log_fn = log if log is not None else (print if self.dist.is_main else _silent)
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
        self.model: nn.Module = self.objective
        if self.dist.world_size > 1:
            self.model = nn.parallel.DistributedDataParallel(
                self.objective,
                device_ids=[self.device] if self.device.type == "cuda" else None,
                **_no_buffer_broadcast(),  # queues and centres are kept in sync by the objectives
            )
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
        self.step = 0
        self.use_amp = config.amp and self.device.type == "cuda"

    # -- setup --------------------------------------------------------------------------
    def _build_loader(self) -> tuple[DataLoader | None, EpochSampler | None]:
        if self.images is None:
            return None, None
        cfg = self.config
        views = self.objective.views(cfg.crop_size, cfg.min_scale).with_options(cfg.view_options)
        dataset = ViewDataset(self.images, views, seed=cfg.seed)
        sampler = EpochSampler(
            len(dataset), cfg.batch_size, self.dist.rank, self.dist.world_size, cfg.seed
        )
        workers = min(cfg.num_workers, process_cores())
        if workers < cfg.num_workers:
            self.log_fn(
                f"num_workers {cfg.num_workers} is more than this process's share of the CPU "
                f"cores; using {workers} data-loader worker(s)"
            )
        loader = DataLoader(
            dataset,
            batch_size=sampler.local_batch,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )
        return loader, sampler

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
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the loss is {loss.item()} at step {self.step}; lower --lr or check the data"
            )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        max_norm = self.config.clip_grad if self.config.clip_grad > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.objective.after_step((self.step + 1) / self.total_steps)
        self.step += 1
        names = sorted(losses)
        values = mean_over_processes(
            torch.stack([full_precision(losses[k].detach()) for k in names])
        )
        out = {k: float(v) for k, v in zip(names, values.tolist())}
        out.update(lr=lr, grad_norm=float(grad_norm))
        return out

    def normalize(self, batch: Batch) -> Batch:
        """Views in [0, 1] → the backbone's normalisation (done on the device)."""
        backbone = self.objective.backbone
        return Batch([backbone.normalize(v) for v in batch.views], batch.labels, batch.masks)

    # -- the loop -----------------------------------------------------------------------
    def batches(self) -> Iterator[Batch]:
        """Batches from the current step on, across epoch boundaries."""
        if self.loader is None:
            raise InputError("no pretraining data: give --data (or pass images= to Trainer)")
        per_epoch = self.sampler.batches_per_epoch
        epoch, offset = divmod(self.step, per_epoch)
        while True:
            self.sampler.set_position(epoch, offset)
            self.loader.dataset.set_epoch(epoch)
            for batch in self.loader:
                yield self.normalize(batch.to(self.device, self.dtype))
            epoch, offset = epoch + 1, 0

    def evaluate(self) -> dict[str, float]:
        """Retrieval scores of the exported backbone (main process; others wait)."""
        result: dict[str, float] = {}
        if self.probe is not None and self.dist.is_main:
            scores = self.probe(self.objective.export_backbone(), self.device)
            result = {f"eval/{k}": v for k, v in scores.items()}
        barrier()
        return result

    def fit(self) -> dict[str, Any]:
        """Train to ``total_steps``; returns the last logged record (with the final eval).

        On a CPU, torch's threads are lowered for the run so that they and the loader's
        workers fit in this process's cores (tiny models otherwise spend most of their
        time in threads waiting on each other), and restored afterwards.
        """
        if self.device.type != "cpu":
            return self._fit()
        workers = self.loader.num_workers if self.loader is not None else 0
        with cpu_threads(process_cores() - workers):
            return self._fit()

    def _fit(self) -> dict[str, Any]:
        cfg = self.config
        self._maybe_resume()  # before the folder is made: a refused --resume leaves nothing
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        barrier()
        if self.dist.is_main:
            write_json(self.out / "config.json", cfg.to_dict())
        last: dict[str, Any] = {"step": self.step}
        if self.step == 0 and self.probe is not None:
            last.update(self.evaluate())
            self._record(last)
        if self.step >= self.total_steps:
            return last
        timer, timed_from = time.perf_counter(), self.step
        for batch in self.batches():
            record: dict[str, Any] = {"step": self.step + 1, **self.train_step(batch)}
            done = self.step >= self.total_steps
            log_now = done or bool(cfg.log_every and self.step % cfg.log_every == 0)
            eval_now = self.probe is not None and (
                done or bool(cfg.eval_every and self.step % cfg.eval_every == 0)
            )
            if log_now:
                record["step_time"] = (time.perf_counter() - timer) / (self.step - timed_from)
            if eval_now:
                record.update(self.evaluate())
            if log_now or eval_now:
                left = (self.total_steps - self.step) * record.get("step_time", 0.0)
                self._record(record, f" eta {format_seconds(left)}" if log_now and not done else "")
                timer, timed_from = time.perf_counter(), self.step
            if done or (cfg.save_every and self.step % cfg.save_every == 0):
                self.save()
            last = record
            if done:
                break
        return last

    # -- files ------------------------------------------------------------------------
    def _record(self, record: dict[str, Any], note: str = "") -> None:
        """Append ``record`` to ``metrics.jsonl`` and log it, followed by ``note``."""
        if not self.dist.is_main:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        shown = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
        )
        self.log_fn(f"[{self.config.objective}] {shown}{note}")

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
            ckpt.save_state(
                self.objective,
                self.optimizer,
                self.step,
                self.out / ckpt.STATE_NAME,
                self.config.to_dict(),
            )
        barrier()

    def _maybe_resume(self) -> None:
        state = self.out / ckpt.STATE_NAME
        if not state.exists():
            if self.config.resume:
                what = "folder" if self.out.is_dir() else "folder, and it does not exist"
                raise InputError(
                    f"--resume: {self.out} holds no run to continue (no {state.name} in the "
                    f"{what}); check --out, or drop --resume to start a new run"
                )
            return
        if not self.config.resume:
            raise InputError(
                f"{self.out} already holds a run ({state.name}); pass --resume to continue it "
                "or choose another --out folder"
            )
        step, saved = ckpt.load_state(state, self.objective, self.optimizer)
        for key in ("objective", "arch", "model_kwargs"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise InputError(
                    f"cannot resume {state}: it was trained with {key}={saved[key]!r}, "
                    f"not {getattr(self.config, key)!r}"
                )
        self.step = step
        self.log_fn(f"resumed from {state} at step {step}")
