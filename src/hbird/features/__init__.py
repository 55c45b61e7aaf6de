"""Feature extractors: images → dense features, one protocol, one registry.

The predictor holds one extractor, picked by name from :data:`FEATURE_EXTRACTORS`:

* ``patch``: the encoder's patch features (``Encoder.forward_patches``).
* ``fungi``: dense FUNGI (Simoncini et al. 2024, appendix B.2), each patch feature
  concatenated with its projected SimCLR gradient.

A new kind of features registers a factory here and nothing else changes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import torch

from hbird.encoders.base import Encoder
from hbird.errors import InputError
from hbird.features.patch import PatchFeatures
from hbird.registry import Factory, Registry, check_options


class FeatureExtractor(Protocol):
    """What the predictor needs from a source of dense features.

    Built by ``FEATURE_EXTRACTORS.create(name, encoder, layers=..., autocast=...,
    batch_size=..., seed=..., progress=..., **options)``; every factory takes these
    common arguments and raises :class:`~hbird.errors.InputError` for those it cannot
    honour.
    """

    feature_dim: int
    """``D``, the width of every feature."""

    def fit(self, views: Iterable[torch.Tensor]) -> FeatureExtractor:
        """Fix whatever the features depend on from the prompt's views ``(3, H, W)``
        (resized for the encoder, not augmented). May not iterate them at all."""

    def transform(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``B`` views ``(3, H, W)`` in [0, 1], sides multiples of the patch size →
        ``B`` float32 CPU feature maps ``(h, w, D)`` (``(B, h, w, D)`` once stacked; a
        list because views may differ in size). A view's features do not depend on the
        other views of the call."""

    def identity(self) -> dict[str, Any]:
        """JSON-ready name and options: two extractors with equal identities, the same
        encoder and the same state give the same features."""

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors fixed by ``fit`` (saved with a bank as its attachments)."""

    def load_state(self, state: dict[str, torch.Tensor]) -> FeatureExtractor:
        """Restore the fitted state from ``state()``'s tensors; return ``self``."""


FEATURE_EXTRACTORS: Registry[Factory] = Registry("feature extractor")
COMMON = ("encoder", "layers", "autocast", "batch_size", "seed", "progress")
"""Arguments every factory takes from hbird itself (the rest are the user's options)."""


def check_extractor_options(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    """Refuse ``kwargs`` that ``factory`` does not take, listing the options it does take."""
    options = [k for k in kwargs if k not in COMMON]
    check_options(f"features {name!r}", factory, options, "feature_options", COMMON)


FEATURE_EXTRACTORS.register("patch", PatchFeatures)


@FEATURE_EXTRACTORS.register("fungi")
def _fungi(encoder: Encoder, **kwargs: Any) -> FeatureExtractor:
    from hbird.features.fungi import FungiFeatures  # gradient machinery, imported on use

    check_extractor_options("fungi", FungiFeatures, kwargs)
    return FungiFeatures(encoder, **kwargs)


def create_extractor(name: str, encoder: Encoder, **kwargs: Any) -> FeatureExtractor:
    """The extractor registered as ``name`` for ``encoder`` (see :class:`FeatureExtractor`)."""
    if name not in FEATURE_EXTRACTORS:
        raise InputError(
            f"unknown features {name!r}; choose one of {', '.join(FEATURE_EXTRACTORS.names())}"
        )
    check_extractor_options(name, FEATURE_EXTRACTORS.get(name), kwargs)  # fungi: on import
    return FEATURE_EXTRACTORS.create(name, encoder, **kwargs)
