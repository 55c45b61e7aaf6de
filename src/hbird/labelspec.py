"""What the per-pixel labels of a prompt mean: shared by data, memory, decode and metrics."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Task = Literal["segmentation", "depth", "regression"]


@dataclass(frozen=True)
class LabelSpec:
    """Label semantics.

    Attributes:
        task: ``"segmentation"`` (class ids), ``"depth"`` (metres, one channel) or
            ``"regression"`` (any per-pixel vector of ``channels`` values).
        num_classes: number of classes (segmentation only).
        ignore_index: class id that marks unlabelled pixels (segmentation only).
        channels: value channels per pixel for depth/regression (1 for depth).
        min_value, max_value: the valid range of depth/regression targets; values
            outside it (and 0, NaN, inf for depth) are invalid and never stored.
        class_names: optional names, one per class.
    """

    task: Task = "segmentation"
    num_classes: int | None = None
    ignore_index: int | None = 255
    channels: int = 1
    min_value: float = -math.inf
    max_value: float = math.inf
    class_names: tuple[str, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        if self.task not in ("segmentation", "depth", "regression"):
            raise ValueError(
                f"task must be 'segmentation', 'depth' or 'regression', not {self.task!r}"
            )
        if self.task == "segmentation":
            if self.num_classes is None or self.num_classes < 1:
                raise ValueError("segmentation needs num_classes >= 1")
            if self.class_names is not None and len(self.class_names) != self.num_classes:
                raise ValueError(
                    f"{len(self.class_names)} class names given for {self.num_classes} classes"
                )
        elif self.channels < 1:
            raise ValueError("channels must be >= 1")
        if self.task == "depth" and self.channels != 1:
            raise ValueError("depth has exactly one channel; use task='regression' for vectors")

    @property
    def value_dim(self) -> int:
        """Width of one memory value: classes for segmentation, channels otherwise."""
        return int(self.num_classes) if self.task == "segmentation" else self.channels

    @property
    def is_classification(self) -> bool:
        return self.task == "segmentation"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = list(self.class_names) if self.class_names else None
        for key in ("min_value", "max_value"):
            if math.isinf(d[key]):
                d[key] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LabelSpec:
        d = dict(d)
        if d.get("class_names") is not None:
            d["class_names"] = tuple(d["class_names"])
        if d.get("min_value") is None:
            d["min_value"] = -math.inf
        if d.get("max_value") is None:
            d["max_value"] = math.inf
        return cls(**d)
