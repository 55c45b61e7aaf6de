"""What a zero-shot model predicts over, and how its ids become a dataset's label ids.

A zero-shot segmenter (``hbird.zeroshot``) is given class *names* and returns, per
pixel, the index of the name that wins. Usually the names are the dataset's classes.
Some protocols predict over a finer vocabulary and map the winners to coarser labels:
COCO-Stuff-27 is predicted over the 171 COCO-Stuff names and each winner becomes its
supercategory (ReCo, sec. 4.1). A dataset with such a protocol sets ``vocabulary``;
:func:`vocabulary_of` gives every segmentation dataset one.

A predicted id outside the vocabulary becomes ``ignore_index``, never class 0 (the
official ReCo COCO-Stuff code sent unmapped values to class 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hbird.errors import InputError


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """Names to predict over and the label id each one stands for.

    Attributes:
        names: ``P`` class names, as a CLIP text encoder should read them.
        to_label: ``(P,)`` int64, the dataset label id of each name.
        ignore_index: what a predicted id outside ``0 .. P-1`` becomes.
    """

    names: tuple[str, ...]
    to_label: torch.Tensor
    ignore_index: int = 255

    def __post_init__(self) -> None:
        if len(self.names) != len(self.to_label):
            raise ValueError(f"{len(self.names)} names but {len(self.to_label)} label ids")
        if len(set(self.names)) != len(self.names):
            raise ValueError("vocabulary names must be unique")

    @classmethod
    def identity(cls, names: Sequence[str], ignore_index: int = 255) -> Vocabulary:
        """The dataset's own classes: name ``i`` is label ``i``."""
        return cls(tuple(names), torch.arange(len(names), dtype=torch.int64), ignore_index)

    def to_labels(self, prediction: torch.Tensor) -> torch.Tensor:
        """Predicted vocabulary ids (any shape, integer) → label ids (same shape, int64)."""
        prediction = prediction.to(torch.int64)
        inside = (prediction >= 0) & (prediction < len(self.names))
        mapped = self.to_label[prediction.clamp(0, len(self.names) - 1)]
        return torch.where(inside, mapped, torch.full_like(mapped, self.ignore_index))


def vocabulary_of(dataset: Any) -> Vocabulary:
    """The dataset's ``vocabulary`` if it has one, else its class names as they are."""
    own = getattr(dataset, "vocabulary", None)
    if own is not None:
        return own
    spec = dataset.label_spec
    if spec.task != "segmentation" or not spec.class_names:
        raise InputError(
            f"{dataset!r} has no class names, so there is nothing to predict zero-shot; "
            "use a segmentation dataset whose classes are named (a folder needs classes.txt)"
        )
    ignore = spec.ignore_index if spec.ignore_index is not None else 255
    return Vocabulary.identity(spec.class_names, ignore)
