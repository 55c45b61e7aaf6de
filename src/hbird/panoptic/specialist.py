"""The contract of a finetuned panoptic specialist, and the specialist registry.

Axial-DeepLab (thesis §3.3, Panoptic-DeepLab's heads on an Axial-ResNet) and
MaX-DeepLab (thesis §4.3, a mask transformer) are trained by one trainer and evaluated
by one protocol. Each is a :class:`PanopticSpecialist`; the trainer calls, per step::

    outputs = model(images)                     # dict of tensors (the heads' outputs)
    losses = model.loss(outputs, targets)       # dict of scalars, "loss" is minimised

and evaluation calls ``model.predict(outputs, size)`` for panoptic maps the metric
(:class:`hbird.metrics.PanopticQuality`) scores.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from hbird.data.panoptic import PanopticMap
from hbird.registry import Registry, check_options

SPECIALISTS: Registry[Callable[..., PanopticSpecialist]] = Registry("panoptic specialist")
"""Builders ``(num_classes, thing_classes, **options) -> PanopticSpecialist`` by name
(``panoptic-deeplab``, ``max-deeplab``); :func:`builtin_specialists` fills it."""
BUILTIN_MODULES = ("hbird.panoptic.axial_deeplab", "hbird.panoptic.max_deeplab")
"""The modules that register hbird's specialists when imported (imported on first use)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class PanopticTarget:
    """One training image's ground truth, at the network's input size.

    Attributes:
        semantic: ``(H, W)`` int64 class ids, ``ignore_index`` on void.
        instance: ``(H, W)`` int64 instance ids within the class (0 for stuff, crowd
            and void).
    """

    semantic: torch.Tensor
    instance: torch.Tensor

    @property
    def panoptic(self) -> PanopticMap:
        return PanopticMap(self.semantic, self.instance)


class PanopticSpecialist(nn.Module):
    """Base class of a trainable panoptic model.

    Attributes:
        name: the registry name.
        num_classes: ``C`` semantic classes (stuff and things).
        thing_classes: the class ids that have instances.
        ignore_index: the void label of targets and predictions.
        backbone: the pretrained part, trained at the backbone learning rate (×0.1).
    """

    name: ClassVar[str]

    def __init__(
        self, num_classes: int, thing_classes: Sequence[int], ignore_index: int = 255
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.thing_classes = tuple(int(c) for c in thing_classes)
        self.ignore_index = ignore_index

    backbone: nn.Module
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → the normalisation :meth:`forward` expects."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the backbone's output stride)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``images`` ``(B, 3, H, W)`` normalised → the heads' outputs, batch first."""
        raise NotImplementedError

    def loss(
        self, outputs: dict[str, torch.Tensor], targets: Sequence[PanopticTarget]
    ) -> dict[str, torch.Tensor]:
        """The training losses, one scalar per term plus their weighted sum ``"loss"``."""
        raise NotImplementedError

    @torch.no_grad()
    def predict(
        self, outputs: dict[str, torch.Tensor], size: tuple[int, int] | None = None
    ) -> list[PanopticMap]:
        """One panoptic map per image, at ``size`` ``(H, W)`` (default: the input size),
        void pixels labelled ``ignore_index``, by the paper's inference rules."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The builder options that rebuild this model (saved beside its checkpoint)."""
        return {}

    def load_backbone(self, path: str) -> None:
        """Load a weights file into :attr:`backbone` (an ``hbird pretrain`` export or a
        layout the backbone converts; :func:`hbird.encoders.conv_backbone.load_backbone_weights`).

        Raises:
            InputError: the file does not fit the backbone.
        """
        from hbird.encoders.conv_backbone import load_backbone_weights

        load_backbone_weights(self.backbone, path, arch=self.name)


def builtin_specialists() -> Registry[Callable[..., PanopticSpecialist]]:
    """:data:`SPECIALISTS` with every module of :data:`BUILTIN_MODULES` that exists imported."""
    for module in BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise
    return SPECIALISTS


def create_specialist(
    name: str, num_classes: int, thing_classes: Sequence[int], **options: Any
) -> PanopticSpecialist:
    """Build the registered specialist ``name`` (unknown options are an InputError)."""
    factory = builtin_specialists().get(name)
    fixed = ("num_classes", "thing_classes")
    check_options(f"specialist {name!r}", factory, options, "specialist_option", fixed)
    return factory(num_classes, thing_classes, **options)
