"""The ``hbird pretrain`` checkpoint format, defined once: what the trainer writes
(:mod:`hbird.pretrain.checkpoint`) and what the encoders read back
(:func:`hbird.encoders.checkpoints.hbird_checkpoint_options`).

A checkpoint is a safetensors file whose header metadata (all strings) holds
``format`` = :data:`FORMAT` and, for an exported backbone, the architecture: ``arch``
(a timm name) and, JSON-encoded, ``model_kwargs`` (the ``timm.create_model`` options it
needs), ``mean`` and ``std`` (its normalisation). The trainer adds ``objective``,
``step`` and ``config``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hbird.errors import InputError

FORMAT = "hbird-pretrain-1"
ARCHITECTURE_KEYS = ("model_kwargs", "mean", "std")
"""The JSON-encoded architecture fields (``arch`` itself is a plain string)."""


def read_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of ``path`` (empty for files without any)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist; check the path")
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def is_hbird_checkpoint(meta: dict[str, str], path: str | Path) -> bool:
    """True for this format; False for other files. A newer hbird format is an error."""
    found = meta.get("format", "")
    if found.startswith("hbird-pretrain") and found != FORMAT:
        raise InputError(
            f"{path} is an hbird checkpoint in format {found!r}; this hbird reads {FORMAT!r}. "
            "Upgrade hbird"
        )
    return found == FORMAT


def architecture_metadata(
    arch: str, model_kwargs: dict[str, Any], mean: Sequence[float], std: Sequence[float]
) -> dict[str, str]:
    """The header fields that let anyone rebuild ``arch`` (see the module docstring)."""
    return {
        "arch": arch,
        "model_kwargs": json.dumps(model_kwargs, sort_keys=True),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
    }


def architecture_options(meta: dict[str, str]) -> dict[str, Any]:
    """The decoded :data:`ARCHITECTURE_KEYS` present in ``meta``."""
    return {key: json.loads(meta[key]) for key in ARCHITECTURE_KEYS if key in meta}
