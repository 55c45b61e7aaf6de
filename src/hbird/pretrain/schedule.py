"""Learning-rate schedules: linear warm-up then a half cosine down to ``final``; poly."""

from __future__ import annotations

import math


def warmup_cosine(
    step: int, total_steps: int, base: float, final: float = 0.0, warmup_steps: int = 0
) -> float:
    """Value at ``step`` (0-based): ``base · (step + 1) / warmup`` during warm-up, then
    ``final + (base − final) · (1 + cos(π · t)) / 2`` with ``t`` going 0 → 1 over the rest."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < warmup_steps:
        return base * (step + 1) / warmup_steps
    rest = max(1, total_steps - warmup_steps)
    t = min(1.0, (step - warmup_steps) / rest)
    return final + (base - final) * (1.0 + math.cos(math.pi * t)) / 2.0


def poly(step: int, total_steps: int, base: float, power: float = 0.9) -> float:
    """DeepLab's poly schedule at ``step`` (0-based): ``base · (1 − step / total)^power``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    return base * max(0.0, 1.0 - step / total_steps) ** power
