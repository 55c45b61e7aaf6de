"""Which mean and std images are normalised with before the encoder sees them.

A normalisation is named by text, so a bank's spec can record it:

* ``"model"``: the mean and std the encoder's weights were trained with (its own);
* ``"imagenet"``: ImageNet's, mean ``(0.485, 0.456, 0.406)``, std ``(0.229, 0.224, 0.225)``;
* ``"M,M,M/S,S,S"``: any RGB mean and std on the [0, 1] scale, e.g. open-hummingbird-eval's
  ``"0.485,0.456,0.406/0.229,0.224,0.255"`` (its std has a typo: blue should be 0.225).
"""

from __future__ import annotations

import copy
import math

from hbird.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder

MeanStd = tuple[tuple[float, float, float], tuple[float, float, float]]

NORMALIZE_FORMS = "model, imagenet or MEAN,MEAN,MEAN/STD,STD,STD (RGB, 0..1 scale)"


def parse_normalize(text: str) -> MeanStd | None:
    """``"model"`` → None (the encoder's own); ``"imagenet"`` or ``"M,M,M/S,S,S"`` →
    ``(mean, std)``. Raises ``ValueError`` naming the valid forms."""
    if text == "model":
        return None
    if text == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    parts = text.split("/") if isinstance(text, str) else []
    try:
        mean, std = (tuple(float(x) for x in p.split(",")) for p in parts)
    except ValueError:
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or not all(map(math.isfinite, mean + std)):
        raise ValueError(f"normalize must be {NORMALIZE_FORMS}, got {text!r}")
    if min(std) <= 0:
        raise ValueError(f"normalize: every std must be > 0, got {text!r}")
    return mean, std  # type: ignore[return-value]


def with_normalize(encoder: Encoder, normalize: str = "model") -> Encoder:
    """``encoder`` normalising with ``normalize``: itself for ``"model"``, else a shallow
    copy (same weights) whose ``mean``/``std`` are replaced. Its ``identity()`` records
    them, so a bank refuses to be searched with another normalisation."""
    mean_std = parse_normalize(normalize)
    if mean_std is None:
        return encoder
    out = copy.copy(encoder)
    out.mean, out.std = mean_std
    return out
