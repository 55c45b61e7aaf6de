"""How the linear head is trained: its settings and their learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

from hbird.errors import InputError

SCHEDULES = ("cosine", "step", "constant")
REGRESSION_LOSSES = ("l1", "l2")


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
            (
                self.schedule in SCHEDULES,
                f"schedule must be one of {SCHEDULES}, got {self.schedule!r}",
            ),
            (
                self.patch_batch_size >= 1,
                f"patch_batch_size must be >= 1, got {self.patch_batch_size}",
            ),
            (
                self.regression_loss in REGRESSION_LOSSES,
                f"regression_loss must be one of {REGRESSION_LOSSES}, got {self.regression_loss!r}",
            ),
            (
                self.cache_dtype in ("float16", "float32"),
                f"cache_dtype must be 'float16' or 'float32', got {self.cache_dtype!r}",
            ),
        ]
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
