"""Reduced-precision forward passes: ``"bf16"`` / ``"fp16"`` names → ``torch.autocast``.

Encoders stay in float32; only their forward passes run under autocast, and the
features they hand back are float32. On a GPU that roughly halves encoding time; on a
CPU without bf16 units it is slower, and it changes the features slightly either way,
so it is recorded with every bank and evaluation that uses it.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

AUTOCAST_DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}
"""Accepted names of autocast dtypes."""

AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
"""The canonical name of each autocast dtype (what configs record)."""


def parse_autocast(value: str | torch.dtype | None) -> torch.dtype | None:
    """``"bf16"``/``"fp16"`` (or a dtype) → the autocast dtype; ``None`` → full precision."""
    if value is None or isinstance(value, torch.dtype):
        return value
    if value not in AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast must be one of {sorted(AUTOCAST_DTYPES)} or None, got {value!r}"
        )
    return AUTOCAST_DTYPES[value]


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for ``None``."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
