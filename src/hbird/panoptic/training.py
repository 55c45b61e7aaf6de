"""One trainer for every panoptic specialist (Axial-DeepLab, MaX-DeepLab; issue 13 part 5).

    config = SpecialistConfig(specialist="panoptic-deeplab", data="synthetic_panoptic:n=64",
                              out="runs/pdl", crop_size=64)
    model = SpecialistTrainer(config).fit_model()

It is :class:`hbird.pretrain.loop.TrainingLoop` (DDP under ``torchrun``, checkpoints,
``resume``, ``metrics.jsonl`` and log lines with the time left, bf16 autocast on GPU
only) around a :class:`~hbird.panoptic.specialist.PanopticSpecialist`. A run on ``W``
processes with ``B / W`` images each is the one-process run on ``B``: every batch norm
is a global-batch one (:func:`hbird.pretrain.backbone.globalize_norms`) and every loss
term is a per-image value averaged over the batch (the specialists' ``loss``).

* **Data**: a panoptic dataset (``config.data``, its ``train`` split unless the spec
  names one) through :class:`PanopticCrops`: Panoptic-DeepLab's augmentation, a random
  rescale by ``[min_scale, max_scale]`` (0.5-2), a random ``crop_size`` crop (padded
  with the mean pixel and void), a horizontal flip; the targets are the crop's semantic
  and instance maps, so centres and offsets are computed at the training crop size.
  Every random choice is a function of ``(seed, epoch, index)``, so a resumed run sees
  the batches of an uninterrupted one.
* **Optimiser**: RAdam with Lookahead (timm's, α = 0.5, k = 6; thesis §3.4, "linear
  warm-up RAdam Lookahead, learning rate 0.001"), or AdamW (``optimizer="adamw"``);
  linear warm-up then DeepLab's poly schedule (power 0.9); the backbone at
  ``backbone_lr_scale`` (0.1) times the learning rate; weight decay on weight matrices
  and kernels only.
* **Backbone weights**: ``init_weights`` loads a file into ``model.backbone``
  (``model.load_backbone``) — an ``hbird pretrain`` export of the same backbone
  (``checkpoint.safetensors``) or any layout the backbone converts (csrhddlam/axial-deeplab
  ``.pth`` for Axial-ResNets); MaX-DeepLab takes the first three stages of a 4-stage
  Axial-ResNet.

The run folder holds ``specialist.safetensors`` (the model and what rebuilds it;
:func:`load_specialist`), ``trainer_state.safetensors`` (resume), ``config.json`` and
``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from hbird.errors import InputError
from hbird.io.checkpoints import FORMAT, is_hbird_checkpoint, read_metadata
from hbird.io.files import save_tensors
from hbird.panoptic.specialist import (
    PanopticSpecialist,
    PanopticTarget,
    builtin_specialists,
    create_specialist,
)
from hbird.pretrain.backbone import globalize_norms
from hbird.pretrain.data import sample_generator
from hbird.pretrain.distributed import DistInfo, barrier
from hbird.pretrain.loop import LoopSettings, TrainingLoop
from hbird.pretrain.schedule import poly

MODEL_NAME = "specialist.safetensors"
OPTIMIZERS = ("radam-lookahead", "adamw")
LOOKAHEAD = {"alpha": 0.5, "k": 6}
TINY_TRAINING = {
    "steps": 400,
    "batch_size": 8,
    "crop_size": 64,
    "min_scale": 0.75,
    "max_scale": 1.25,
    "optimizer": "adamw",
    "lr": 3e-3,
    "backbone_lr_scale": 1.0,
}
"""A CPU preset for tiny models trained from scratch on 64-px scenes (issue 13's
acceptance): AdamW at 3e-3, the backbone at the full rate (it starts random), milder
rescaling. Measured cost of the paper's optimiser instead, after 50 steps on the
acceptance data: RAdam + Lookahead at the same rate had a centre loss of 0.35 against
AdamW's 0.034 (not run to the end; a guess at the cause: RAdam's first steps are
un-adapted momentum SGD, and the ×200 heatmap loss makes their gradients large)."""


@dataclass(frozen=True)
class SpecialistConfig(LoopSettings):
    """Everything that decides a specialist's training run (and the loop's
    :class:`~hbird.pretrain.loop.LoopSettings`: ``log_every``, ``save_every``, ``seed``,
    ``device``, ``amp``, ``resume``).

    Attributes:
        specialist: a registered name (``panoptic-deeplab``, ``max-deeplab``).
        specialist_options: its builder's options (e.g. ``{"backbone": "test_axial"}``).
        init_weights: a weights file for ``model.backbone`` (module docstring).
        data: a panoptic dataset spec (its train split by default).
        out: run folder. steps: optimizer steps; ``epochs`` (passes over the data)
            overrides it when given. batch_size: global batch.
        crop_size: training crop side (a multiple of the model's ``size_multiple``).
        min_scale, max_scale: the random rescale before cropping (Panoptic-DeepLab: 0.5-2).
        flip: random horizontal flips.
        optimizer: ``radam-lookahead`` (thesis §3.4) or ``adamw``.
        lr: base learning rate (0.001); backbone_lr_scale: the backbone's factor (0.1).
        weight_decay: on weight matrices and kernels. warmup_steps: linear warm-up
            (default 5 % of the steps), then poly with power ``poly_power`` (0.9).
        clip_grad: max gradient norm (0 = off).
        num_workers: data-loader workers per process.
    """

    specialist: str = "panoptic-deeplab"
    specialist_options: dict[str, Any] = field(default_factory=dict)
    init_weights: str | None = None
    data: str | None = None
    out: str = "runs/specialist"
    steps: int = 1000
    epochs: int | None = None
    batch_size: int = 8
    crop_size: int = 512
    min_scale: float = 0.5
    max_scale: float = 2.0
    flip: bool = True
    optimizer: str = "radam-lookahead"
    lr: float = 1e-3
    backbone_lr_scale: float = 0.1
    weight_decay: float = 0.0
    warmup_steps: int | None = None
    poly_power: float = 0.9
    clip_grad: float = 0.0
    num_workers: int = 2

    def validate(self) -> None:
        known = builtin_specialists()
        if self.specialist not in known:
            raise InputError(
                f"unknown specialist {self.specialist!r}; choose one of {', '.join(known.names())}"
            )
        checks = [
            (self.steps >= 1, "steps must be >= 1"),
            (self.epochs is None or self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.crop_size >= 1, "crop_size must be >= 1"),
            (0 < self.min_scale <= self.max_scale, "need 0 < min_scale <= max_scale"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.lr > 0, "lr must be > 0"),
            (self.backbone_lr_scale >= 0, "backbone_lr_scale must be >= 0"),
            (self.clip_grad >= 0, "clip_grad must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"specialist training: {message}")


def config_fields() -> list[str]:
    """The field names of :class:`SpecialistConfig` (for flag errors)."""
    return [f.name for f in dataclasses.fields(SpecialistConfig)]


# -- data -----------------------------------------------------------------------------------


class SpecialistBatch(NamedTuple):
    """``images`` ``(B, 3, S, S)`` in [0, 1] and one :class:`PanopticTarget` per image."""

    images: torch.Tensor
    targets: list[PanopticTarget]


class PanopticCrops:
    """A panoptic dataset's samples as random training crops (module docstring).

    Args:
        dataset: items with ``image`` ``(3, H, W)``, ``label`` (semantic) and ``instance``.
        crop_size, min_scale, max_scale, flip: the augmentation.
        fill: the image's padding colour (the model's mean pixel); labels pad as void.
        ignore_index: the semantic void id. seed: the augmentation's seed.
    """

    def __init__(
        self,
        dataset: Any,
        crop_size: int,
        min_scale: float = 0.5,
        max_scale: float = 2.0,
        flip: bool = True,
        fill: Sequence[float] = (0.485, 0.456, 0.406),
        ignore_index: int = 255,
        seed: int = 0,
    ) -> None:
        self.dataset, self.crop_size = dataset, crop_size
        self.min_scale, self.max_scale, self.flip = min_scale, max_scale, flip
        self.fill, self.ignore_index, self.seed = tuple(fill), ignore_index, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, PanopticTarget]:
        sample = self.dataset[i]
        gen = sample_generator(self.seed, self.epoch, i)
        return self.crop(sample.image, sample.label, sample.instance, gen)

    def crop(
        self,
        image: torch.Tensor,
        semantic: torch.Tensor,
        instance: torch.Tensor,
        gen: torch.Generator,
    ) -> tuple[torch.Tensor, PanopticTarget]:
        """Rescale, pad, crop and flip one ``(3, H, W)`` image and its ``(H, W)`` maps."""
        scale = self.min_scale + (self.max_scale - self.min_scale) * float(
            torch.rand(1, generator=gen)
        )
        height, width = semantic.shape
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        labels = torch.stack([semantic, instance]).long()
        if size != (height, width):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            labels = F.interpolate(labels[None].float(), size=size, mode="nearest")[0].long()
        side = self.crop_size
        pad_h, pad_w = max(0, side - size[0]), max(0, side - size[1])
        if pad_h or pad_w:
            fill = torch.tensor(self.fill, dtype=image.dtype).view(3, 1, 1)
            image = F.pad(image - fill, (0, pad_w, 0, pad_h)) + fill
            labels = torch.stack(
                [
                    F.pad(labels[0], (0, pad_w, 0, pad_h), value=self.ignore_index),
                    F.pad(labels[1], (0, pad_w, 0, pad_h), value=0),
                ]
            )
        top = int(torch.randint(0, labels.shape[1] - side + 1, (1,), generator=gen))
        left = int(torch.randint(0, labels.shape[2] - side + 1, (1,), generator=gen))
        image = image[:, top : top + side, left : left + side]
        labels = labels[:, top : top + side, left : left + side]
        if self.flip and float(torch.rand(1, generator=gen)) < 0.5:
            image, labels = image.flip(-1), labels.flip(-1)
        return image.contiguous(), PanopticTarget(labels[0].contiguous(), labels[1].contiguous())


def collate(items: Sequence[tuple[torch.Tensor, PanopticTarget]]) -> SpecialistBatch:
    return SpecialistBatch(torch.stack([image for image, _ in items]), [t for _, t in items])


def open_training_data(spec: str) -> Any:
    """The panoptic dataset of ``spec`` (its ``train`` split unless the spec names one)."""
    from hbird.data.datasets import create_dataset
    from hbird.data.panoptic import is_panoptic
    from hbird.io.options import parse_spec

    _, fields = parse_spec(spec)
    dataset = create_dataset(spec, **({} if "split" in fields else {"split": "train"}))
    if not is_panoptic(dataset):
        raise InputError(
            f"{spec!r} has no instance labels; a specialist trains on a panoptic dataset "
            "(folder with panoptic/, cityscapes_panoptic, coco_panoptic, kitti_step_panoptic, "
            "synthetic_panoptic)"
        )
    return dataset


# -- optimiser ------------------------------------------------------------------------------


def parameter_groups(
    model: PanopticSpecialist, weight_decay: float, backbone_lr_scale: float
) -> list[dict[str, Any]]:
    """Groups ``(backbone | rest) × (decay | no decay)``, each with its ``lr_scale``;
    1-d parameters (biases, norms) have no weight decay."""
    in_backbone = {id(p) for p in model.backbone.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in in_backbone, p.ndim >= 2), []).append(p)
    return [
        {
            "params": params,
            "lr_scale": backbone_lr_scale if backbone else 1.0,
            "weight_decay": weight_decay if decay else 0.0,
        }
        for (backbone, decay), params in sorted(groups.items())
    ]


def build_optimizer(model: PanopticSpecialist, config: SpecialistConfig) -> torch.optim.Optimizer:
    """RAdam + Lookahead or AdamW over :func:`parameter_groups` (module docstring)."""
    groups = parameter_groups(model, config.weight_decay, config.backbone_lr_scale)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    from timm.optim import Lookahead

    base = torch.optim.RAdam(groups, lr=config.lr, decoupled_weight_decay=True)
    return Lookahead(base, **LOOKAHEAD)


def warmup_poly(step: int, total_steps: int, base: float, warmup_steps: int, power: float) -> float:
    """``base · (step + 1) / warmup`` during the warm-up, then DeepLab's poly
    ``base · (1 − step / total)^power`` (0-based ``step``)."""
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    return poly(step, total_steps, base, power)


# -- checkpoints ----------------------------------------------------------------------------


def save_specialist(model: PanopticSpecialist, path: str | Path, extra: dict[str, str]) -> Path:
    """Write ``model``'s weights and what rebuilds it (name, label space, options)."""
    meta = {
        "format": FORMAT,
        "specialist": model.name,
        "num_classes": str(model.num_classes),
        "thing_classes": json.dumps(list(model.thing_classes)),
        "ignore_index": str(model.ignore_index),
        "options": json.dumps(model.options(), sort_keys=True),
        **extra,
    }
    return save_tensors(Path(path), dict(model.state_dict()), meta)


def load_specialist(path: str | Path, device: str | torch.device = "cpu") -> PanopticSpecialist:
    """Rebuild and load a :func:`save_specialist` file (in eval mode).

    Raises:
        InputError: the file is missing, not a specialist, or does not fit its own options.
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise InputError(f"no specialist checkpoint at {path}; give a {MODEL_NAME} file")
    try:
        meta = read_metadata(path)
    except InputError:
        raise
    except Exception as err:  # safetensors' own errors: not a safetensors file
        raise InputError(f"{path} is not a readable safetensors file ({err})") from None
    if not is_hbird_checkpoint(meta, path) or "specialist" not in meta:
        raise InputError(
            f"{path} is not an hbird specialist checkpoint (no 'specialist' in its metadata); "
            f"give the {MODEL_NAME} of a specialist run"
        )
    model = create_specialist(
        meta["specialist"],
        int(meta["num_classes"]),
        json.loads(meta["thing_classes"]),
        ignore_index=int(meta["ignore_index"]),
        **json.loads(meta["options"]),
    )
    try:
        model.load_state_dict(load_file(str(path)))
    except RuntimeError as err:
        raise InputError(f"{path} does not fit its own specialist options ({err})") from None
    return model.to(device).eval()


# -- the trainer ----------------------------------------------------------------------------


class SpecialistTrainer(TrainingLoop):
    """Builds the specialist, its optimiser and the crops of the data, and trains it.

    Args:
        config: the run's :class:`SpecialistConfig`.
        dist: this process's place (:func:`hbird.pretrain.distributed.init_distributed`).
        dataset: a panoptic dataset overriding ``config.data``.
        log: where log lines go (default ``print`` on the main process).
    """

    resume_keys = ("specialist", "specialist_options", "crop_size")

    def __init__(
        self,
        config: SpecialistConfig,
        dist: DistInfo | None = None,
        dataset: Any | None = None,
        log: Callable[[str], None] | None = None,
    ) -> None:
        config.validate()
        self.start(config, dist, log)
        if dataset is None:
            if config.data is None:
                raise InputError("no training data: give a panoptic dataset spec (data=...)")
            dataset = open_training_data(config.data)
        spec = dataset.label_spec
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            model = create_specialist(
                config.specialist,
                int(spec.num_classes),
                dataset.thing_classes,
                ignore_index=int(spec.ignore_index),
                **config.specialist_options,
            )
        if config.init_weights is not None:
            model.load_backbone(config.init_weights)
        self.module: PanopticSpecialist = globalize_norms(model).to(self.device)
        step = self.module.size_multiple
        if config.crop_size % step:
            raise InputError(
                f"crop_size {config.crop_size} is not a multiple of {config.specialist}'s "
                f"size multiple {step}; use e.g. crop_size={-(-config.crop_size // step) * step}"
            )
        self.model = self.wrap(self.module)
        self.optimizer = build_optimizer(self.module, config)
        crops = PanopticCrops(
            dataset,
            config.crop_size,
            config.min_scale,
            config.max_scale,
            config.flip,
            self.module.mean,
            int(spec.ignore_index),
            config.seed,
        )
        self.loader, self.sampler = self.epoch_loader(
            crops, config.batch_size, config.num_workers, config.seed, collate
        )
        self.total_steps = self._total_steps()
        self.use_amp = config.amp and self.device.type == "cuda"

    def _total_steps(self) -> int:
        """``steps``, or ``epochs`` times the global batches in an epoch."""
        cfg = self.config
        if cfg.epochs is None:
            return cfg.steps
        return cfg.epochs * self.sampler.batches_per_epoch  # >= 1: the sampler checks

    @property
    def log_name(self) -> str:
        return self.config.specialist

    @property
    def warmup_steps(self) -> int:
        w = self.config.warmup_steps
        return w if w is not None else self.total_steps // 20

    def learning_rate(self, step: int) -> float:
        cfg = self.config
        return warmup_poly(step, self.total_steps, cfg.lr, self.warmup_steps, cfg.poly_power)

    def batches(self) -> Iterator[SpecialistBatch]:
        """This process's share of each global batch, images in the parameters' dtype."""
        dtype = next(self.module.parameters()).dtype
        for images, targets in self.epoch_batches():
            images = images.to(self.device, dtype, non_blocking=True)
            yield SpecialistBatch(self.module.normalize(images), targets)

    def train_step(self, batch: SpecialistBatch) -> dict[str, float]:
        """One optimizer step on this process's share of the global batch."""
        self.model.train()
        lr = self.learning_rate(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
            outputs = self.model(batch.images)
        losses = self.module.loss(outputs, batch.targets)
        grad_norm = self.optimize(losses["loss"])
        self.step += 1
        return {**self.averaged(losses), "lr": lr, "grad_norm": grad_norm}

    def save(self) -> None:
        """Write the specialist and the resumable state (main process only)."""
        if self.dist.is_main:
            meta = {
                "step": str(self.step),
                "config": json.dumps(self.config.to_dict(), sort_keys=True, default=str),
            }
            save_specialist(self.module, self.out / MODEL_NAME, meta)
            self.save_state()
        barrier()

    def fit_model(self) -> PanopticSpecialist:
        """:meth:`fit`, then the trained specialist in eval mode."""
        self.fit()
        return self.module.eval()
