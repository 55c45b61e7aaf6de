"""The contract every pretraining objective follows, and the objective registry.

An objective owns the online network (the backbone being trained plus its heads), any
EMA target, queues and centres. The trainer calls, per step::

    losses = objective(batch, progress)      # dict of scalars, "loss" is minimised
    loss.backward(); optimizer.step()
    objective.after_step(progress)           # EMA updates

``progress`` is the fraction of training done (``step / total_steps``), which drives the
objectives' own schedules (EMA momentum, teacher temperature).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hbird.pretrain.augment import ViewSampler
from hbird.pretrain.backbone import Backbone
from hbird.pretrain.options import config_from_options
from hbird.registry import Registry

OBJECTIVES: Registry[Any] = Registry("pretraining objective")


@dataclass
class Batch:
    """One (per-process) batch.

    Attributes:
        views: one normalised ``(B, 3, S, S)`` tensor per view (sizes may differ by view).
        labels: ``(B,)`` int64 image labels, ``-1`` where unknown.
        masks: iBOT's ``(B, h, w)`` bool patch masks, one per global view, or None.
    """

    views: list[torch.Tensor]
    labels: torch.Tensor
    masks: list[torch.Tensor] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """Move to ``device``; views also to ``dtype`` if given (masks and labels keep theirs)."""
        return Batch(
            views=[v.to(device, dtype, non_blocking=True) for v in self.views],
            labels=self.labels.to(device, non_blocking=True),
            masks=None
            if self.masks is None
            else [m.to(device, non_blocking=True) for m in self.masks],
        )

    @property
    def size(self) -> int:
        return self.labels.shape[0]


class Objective(nn.Module):
    """Base class. Subclasses set ``name`` and ``Config`` and implement ``forward``.

    Subclasses register the backbone inside their online network and expose it as the
    ``backbone`` property (registering it twice would duplicate it in the state dict).

    Attributes:
        config: the objective's frozen config dataclass.
    """

    name: ClassVar[str]
    Config: ClassVar[type]
    needs_labels: ClassVar[bool] = False

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config

    @property
    def backbone(self) -> Backbone:
        """The online :class:`Backbone` (what is trained)."""
        raise NotImplementedError

    def views(self, crop_size: int, min_scale: float | None = None) -> ViewSampler:
        """The augmentation producing this objective's views from one image."""
        raise NotImplementedError

    def forward(self, batch: Batch, progress: float) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self, progress: float) -> None:
        """Called after every optimizer step (EMA updates); default: nothing."""

    def export_backbone(self) -> Backbone:
        """The network a checkpoint exports as the encoder (default: the online backbone)."""
        return self.backbone

    def no_weight_decay(self) -> set[str]:
        """Parameter names that take no weight decay, timm's ``no_weight_decay()`` convention.

        Every sub-module's own ``no_weight_decay()`` (a timm ViT's position embedding,
        class, register and distillation tokens) under its path in this objective, e.g.
        ``online.backbone.model.pos_embed``. Biases, norms and other 1-d parameters are
        left out of weight decay by the trainer whatever their names.
        """
        names: set[str] = set()
        for path, module in self.named_modules():
            if module is not self and callable(getattr(module, "no_weight_decay", None)):
                names |= {f"{path}.{name}" for name in module.no_weight_decay()}
        return names & {name for name, _ in self.named_parameters()}

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]


def create_objective(
    name: str, backbone: Backbone, options: Mapping[str, Any] | None = None, **extra: Any
) -> Objective:
    """Build a registered objective around ``backbone`` with ``options`` for its config.

    ``extra`` goes to the objective's constructor (e.g. ``num_classes`` for Hummingbird++).
    """
    cls: Callable[..., Objective] = OBJECTIVES.get(name)
    config = config_from_options(cls.Config, options)
    return cls(backbone, config, **extra)


def config_dict(config: Any) -> dict[str, Any]:
    """A JSON-ready dict of an objective config."""
    return {
        k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()
    }
