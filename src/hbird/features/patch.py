"""The encoder's own patch features."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from hbird.encoders.base import Encoder, Layers
from hbird.encoders.inference import encode_batches
from hbird.encoders.precision import parse_autocast
from hbird.errors import InputError


class PatchFeatures:
    """``Encoder.forward_patches`` of the chosen blocks, batched (nothing to fit).

    Args:
        encoder: a frozen encoder.
        layers: block index or indices (default: the last block); several are concatenated.
        autocast: ``"bf16"``/``"fp16"`` to encode under autocast, ``None`` for float32.
        batch_size: most views per forward pass.
        seed, progress: accepted like every extractor's; patch features use neither.
        compile: encode through ``torch.compile`` with weight freezing
            (:mod:`hbird.encoders.compiled`; ``feature_options`` ``compile=true``): faster
            on long runs of equal-size images after a compile per batch shape, features
            slightly different (recorded in :meth:`identity`).
        bf16_model: with ``autocast="bf16"``, encode with the whole encoder in bf16
            (:mod:`hbird.encoders.bf16_model`; ``feature_options`` ``bf16_model=true``):
            faster on the CPU, features further from float32 (recorded in
            :meth:`identity`).
    """

    def __init__(
        self,
        encoder: Encoder,
        layers: Layers = None,
        autocast: str | None = None,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool = False,
        compile: bool = False,
        bf16_model: bool = False,
    ) -> None:
        if bf16_model is not True and bf16_model is not False:
            raise InputError(f"feature option bf16_model must be true or false, got {bf16_model!r}")
        if bf16_model and (parse_autocast(autocast) != torch.bfloat16 or compile):
            raise InputError(
                "feature option bf16_model=true runs the whole encoder in bf16: it needs "
                f"autocast=bf16 (--autocast bf16) and no compile=true (got autocast={autocast!r}"
                f"{', compile=true' if compile else ''})"
            )
        self.encoder = encoder
        self.compile = compile
        self.bf16_model = bf16_model
        self.layers = layers
        self.autocast = autocast
        self.batch_size = batch_size
        self.feature_dim = encoder.feature_dim(layers)

    def fit(self, views: Iterable[torch.Tensor]) -> PatchFeatures:
        return self

    def transform(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``B`` views ``(3, H, W)`` → ``B`` maps ``(h, w, D)``."""
        return encode_batches(
            self.encoder,
            views,
            layers=self.layers,
            batch_size=self.batch_size,
            autocast=self.autocast,
            compile=self.compile,
            bf16_model=self.bf16_model,
        )

    def identity(self) -> dict[str, Any]:
        layers = list(self.layers) if isinstance(self.layers, tuple | list) else self.layers
        identity = {"name": "patch", "layers": layers, "autocast": self.autocast}
        if self.compile:
            identity["compile"] = True
        if self.bf16_model:
            identity["bf16_model"] = True
        return identity

    def state(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> PatchFeatures:
        return self
