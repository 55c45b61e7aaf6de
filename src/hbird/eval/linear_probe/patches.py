"""The prompt as a table of labelled patch features, extracted once for training."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird.data.transforms import resize_for_encoder, resize_label
from hbird.encoders import Encoder, encode_batches
from hbird.errors import InputError
from hbird.eval.config import EvalConfig
from hbird.labelspec import LabelSpec
from hbird.memory.labels import pool_labels


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
    """Encode every prompt image once at ``cfg.image_size`` and pool its labels to patches."""
    dtype = getattr(torch, cache_dtype)
    features, targets, owners, seconds = [], [], [], []
    bar = tqdm(total=len(prompt), desc="prompt features", unit="img", disable=not progress)
    for start in range(0, len(prompt), cfg.batch_size):
        t0 = time.perf_counter()
        samples = [prompt[i] for i in range(start, min(start + cfg.batch_size, len(prompt)))]
        views = [resize_for_encoder(s.image, cfg.image_size, encoder.patch_size) for s in samples]
        feats = encode_batches(
            encoder, views, layers=cfg.layers, batch_size=cfg.batch_size, autocast=cfg.autocast
        )
        for offset, (sample, view, feat) in enumerate(zip(samples, views, feats)):
            label = resize_label(sample.label, tuple(view.shape[-2:]))
            try:
                values, valid = pool_labels(label, encoder.patch_size, spec)
            except InputError as err:
                raise InputError(f"label of prompt image {sample.name}: {err}") from None
            features.append(feat.reshape(-1, feat.shape[-1])[valid].to(dtype))
            targets.append(values[valid])
            owners.append(torch.full((int(valid.sum()),), start + offset, dtype=torch.int64))
        per_image = (time.perf_counter() - t0) / len(samples)
        seconds += [per_image] * len(samples)
        bar.update(len(samples))
    bar.close()
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
