"""The prompt as a table of labelled patch features, extracted once for training."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hbird.data.pairs import DatasetPairs
from hbird.encoders import Encoder
from hbird.errors import InputError
from hbird.eval.config import EvalConfig
from hbird.features.patch import PatchFeatures
from hbird.labelspec import LabelSpec
from hbird.memory.prompt import encode_prompt


@dataclass
class PatchTable:
    """Valid prompt patches, ready for training.

    Attributes:
        features: ``(N, D)`` patch features (``cache_dtype``).
        targets: ``(N, C)`` float32: class fractions, or mean values of valid pixels.
        image_index: ``(N,)`` int64, the prompt image each patch comes from.
        seconds: ``(num_images,)`` float64 wall-clock seconds spent on each image
            (loading, resizing, encoding, pooling).
    """

    features: torch.Tensor
    targets: torch.Tensor
    image_index: torch.Tensor
    seconds: torch.Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def nbytes(self) -> int:
        tensors = (self.features, self.targets, self.image_index)
        return sum(t.element_size() * t.numel() for t in tensors)

    def select(self, images: Sequence[int]) -> PatchTable:
        """The patches of the prompt images ``images`` (positions in the prompt)."""
        chosen = torch.as_tensor(list(images), dtype=torch.int64)
        keep = torch.isin(self.image_index, chosen)
        return PatchTable(
            self.features[keep], self.targets[keep], self.image_index[keep], self.seconds[chosen]
        )


def extract_patch_table(
    encoder: Encoder,
    prompt: Any,
    spec: LabelSpec,
    cfg: EvalConfig,
    cache_dtype: str = "float16",
    progress: bool = True,
) -> PatchTable:
    """Encode every prompt image once at ``cfg.image_size`` and pool its labels to patches
    (:func:`hbird.memory.prompt.encode_prompt`, as the memory bank does)."""
    dtype = getattr(torch, cache_dtype)
    extractor = PatchFeatures(encoder, cfg.layers, cfg.autocast, cfg.batch_size)
    batches = encode_prompt(
        DatasetPairs(prompt),
        extractor.transform,
        spec,
        cfg.image_size,
        encoder.patch_size,
        resize=cfg.resize,
        ignore_as_class0=cfg.label_pooling == "ignore_as_class0",
        batch_size=cfg.batch_size,
        progress=progress and "prompt features",
    )
    features, targets, owners, seconds = [], [], [], []
    t0 = time.perf_counter()
    for batch in batches:  # (the next batch is loaded and encoded when it is asked for)
        for p in batch:
            features.append(p.features[p.valid].to(dtype))
            targets.append(p.values[p.valid])
            owners.append(torch.full((int(p.valid.sum()),), p.image, dtype=torch.int64))
        per_image = (time.perf_counter() - t0) / len(batch)
        seconds += [per_image] * len(batch)
        t0 = time.perf_counter()
    table = PatchTable(
        torch.cat(features),
        torch.cat(targets),
        torch.cat(owners),
        torch.tensor(seconds, dtype=torch.float64),
    )
    if len(table) == 0:
        raise InputError(
            "the prompt has no labelled patch (every pixel is ignored or invalid); "
            "check the labels and the ignore index / valid range"
        )
    return table
