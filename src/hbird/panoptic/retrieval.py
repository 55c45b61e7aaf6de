"""In-context panoptic prediction by retrieval (issue 13 part 6).

The semantic map is eq. 1 of Balazevic et al. (2023) as for semantic segmentation: an
:class:`~hbird.predictor.InContextPredictor` over the prompt's class fractions. Thing
pixels become instances in one of two ways (``grouping``):

* ``"components"``: connected components of each predicted thing class; touching
  instances of one class merge;
* ``"offsets"``: a second memory stores, for every prompt patch, where its instance's
  centre lies: the regression target ``(t, t·dy/H, t·dx/W)`` per pixel, ``t`` = 1 on
  the pixels of a thing instance and 0 on stuff, ``(dy, dx)`` the offset to the
  instance's centre of mass (:mod:`hbird.panoptic.targets`) in units of the image's
  height and width (so they survive the resize to the encoder); void and crowd pixels
  are invalid. Eq. 1 averages patch values linearly, so the decoded offset of a query
  pixel is ``(t·dy)^ / t^``: the thing-weighted mean of its neighbours' offsets. The
  offsets are then grouped as Panoptic-DeepLab does (:func:`~hbird.panoptic.grouping.group_offsets`),
  centres found in the offsets' votes. Retrieved offsets are known per patch, so the
  votes are blurred by one encoder patch (σ = the patch's side in query pixels) and the
  NMS window spans about three (``2·round(1.5·patch) + 1`` px): chosen on a tuning split
  of ``synthetic_panoptic`` (seed 2; σ of 3-5 px and windows of 9-17 px tried at 4 px
  patches), not from a paper.

The offset memory is built without augmentation epochs (``aug_epochs=1``,
``augment_first_epoch=False``): a random rescale of the prompt image would rescale its
offsets too, which the label pipeline (nearest-neighbour resampling) cannot know.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hbird.data.datasets import Sample
from hbird.data.panoptic import PanopticMap
from hbird.labelspec import LabelSpec
from hbird.panoptic.grouping import group_components, group_offsets
from hbird.panoptic.targets import centre_offsets, instance_centres

GROUPINGS = ("offsets", "components")
OFFSET_SPEC = LabelSpec("regression", channels=3)
"""The offset memory's values: ``(t, t·dy/H, t·dx/W)``."""
OFFSET_MEMORY = {"aug_epochs": 1, "augment_first_epoch": False, "sampling": None}
"""Bank settings the offset memory overrides (see the module docstring)."""


def offset_target(
    semantic: torch.Tensor,
    instance: torch.Tensor,
    thing_classes: Sequence[int],
    ignore_index: int | None = 255,
) -> torch.Tensor:
    """``(H, W, 3)`` float32 regression target ``(t, t·dy/H, t·dx/W)``; NaN on void and
    on crowd pixels (thing pixels of instance 0)."""
    height, width = semantic.shape
    offsets, on_instance = centre_offsets(instance_centres(semantic, instance, thing_classes))
    things = torch.isin(semantic, torch.as_tensor(list(thing_classes), dtype=semantic.dtype))
    t = on_instance.to(torch.float32)
    target = torch.stack([t, t * offsets[0] / height, t * offsets[1] / width], dim=-1)
    invalid = things & ~on_instance
    if ignore_index is not None:
        invalid |= semantic == ignore_index
    return target.masked_fill(invalid[..., None], float("nan"))


class OffsetTargets:
    """A panoptic dataset seen as a regression prompt: ``label`` = :func:`offset_target`."""

    label_spec = OFFSET_SPEC

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Sample:
        s = self.dataset[i]
        spec = self.dataset.label_spec
        target = offset_target(s.label, s.instance, self.dataset.thing_classes, spec.ignore_index)
        return Sample(s.name, s.image, target, s.image_path, s.label_path)


@dataclass
class PanopticPrediction:
    """One query's panoptic prediction at its own size.

    Attributes:
        labels: the :class:`~hbird.data.panoptic.PanopticMap` (what the metric scores).
        semantic: eq. 1's ``(H, W)`` class ids before grouping.
        confidence: ``(H, W)`` the winning class's weight.
        offsets: ``(2, H, W)`` decoded offsets in pixels (``"offsets"`` grouping), else None.
    """

    labels: PanopticMap
    semantic: torch.Tensor
    confidence: torch.Tensor
    offsets: torch.Tensor | None = None


def decode_offsets(values: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Decoded ``(H, W, 3)`` values ``(t, t·dy/H, t·dx/W)`` → ``(2, H, W)`` offsets in pixels."""
    height, width = values.shape[:2]
    t = values[..., 0].clamp_min(eps)
    return torch.stack([values[..., 1] / t * height, values[..., 2] / t * width])


class PanopticRetriever:
    """Eq. 1 for the semantic map (and the offsets), then grouping.

    Args:
        semantic: a fitted :class:`~hbird.predictor.InContextPredictor` over class ids.
        offsets: a fitted one over :data:`OFFSET_SPEC` values, needed for ``"offsets"``.
        thing_classes: the thing class ids. ignore_index: the void id of the output.
        grouping: ``"offsets"`` or ``"components"`` (module docstring).
    """

    def __init__(
        self,
        semantic: Any,
        offsets: Any | None,
        thing_classes: Sequence[int],
        ignore_index: int = 255,
        grouping: str = "offsets",
    ) -> None:
        if grouping not in GROUPINGS:
            raise ValueError(f"grouping must be one of {GROUPINGS}, not {grouping!r}")
        if grouping == "offsets" and offsets is None:
            raise ValueError("grouping='offsets' needs the offset memory's predictor")
        self.semantic, self.offsets = semantic, offsets
        self.thing_classes = tuple(thing_classes)
        self.ignore_index = ignore_index
        self.grouping = grouping

    def patch_pixels(self, size: tuple[int, int]) -> float:
        """The side of one encoder patch in the pixels of a query of ``size`` ``(H, W)``."""
        spec = self.offsets.spec_
        return self.offsets.encoder_.patch_size * min(size) / spec.image_size

    def predict(self, images: list[torch.Tensor]) -> list[PanopticPrediction]:
        """``(3, H, W)`` images → one :class:`PanopticPrediction` each."""
        dense = self.semantic.predict_dense(images)
        regressed = (
            self.offsets.predict_dense(images)
            if self.grouping == "offsets"
            else [None] * len(dense)
        )
        out = []
        for sem, reg in zip(dense, regressed):
            if reg is None:
                labels = group_components(sem.labels, self.thing_classes, self.ignore_index)
                out.append(PanopticPrediction(labels, sem.labels, sem.confidence))
                continue
            offsets = decode_offsets(reg.labels)
            patch = self.patch_pixels(tuple(sem.labels.shape))
            labels = group_offsets(
                sem.labels,
                offsets,
                self.thing_classes,
                self.ignore_index,
                vote_sigma=patch,
                nms_kernel=2 * round(1.5 * patch) + 1,
            )
            out.append(PanopticPrediction(labels, sem.labels, sem.confidence, offsets))
        return out
