"""Dense FUNGI behind the feature-extractor protocol (Simoncini et al. 2024, appendix B.2)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from hbird.encoders.base import Encoder
from hbird.encoders.inference import encode_batches
from hbird.errors import BankError, InputError
from hbird.fungi.dense import DenseFungi

SUPPORT = "fungi_support"
"""Name of the support set among a bank's attachments."""


class FungiFeatures:
    """``[patch feature, projected SimCLR gradient]`` per patch: ``(h, w, 2·D)``.

    ``fit`` fixes the support set that gives every image its negatives: the last-block
    patch features of the prompt views, a seeded sample of ``support_size`` of them if
    there are more.

    Args:
        encoder: a frozen encoder.
        layers, autocast: must be None (FUNGI uses the last block, in full precision).
        batch_size: images per forward/backward pass.
        seed: seeds the support sample, the random head and the projection.
        progress: a progress bar while the support set is encoded.
        support_size: most support features kept.
    """

    def __init__(
        self,
        encoder: Encoder,
        layers: Any = None,
        autocast: str | None = None,
        batch_size: int = 16,
        seed: int = 0,
        progress: bool = False,
        support_size: int = 100_000,
    ) -> None:
        if layers is not None:
            raise InputError("features='fungi' uses the last block's features; leave layers unset")
        if autocast is not None:
            raise InputError("features='fungi' runs in full precision; leave autocast unset")
        if isinstance(support_size, bool) or not isinstance(support_size, int) or support_size < 1:
            raise InputError(f"fungi support_size must be an integer >= 1, got {support_size!r}")
        self.encoder = encoder
        self.seed = seed
        self.progress = progress
        self.support_size = support_size
        self.dense = DenseFungi(encoder, seed=seed, batch_size=batch_size)
        self.feature_dim = self.dense.feature_dim

    def fit(self, views: Iterable[torch.Tensor]) -> FungiFeatures:
        """Encode the prompt views ``(3, H, W)`` and keep (a sample of) their patch features."""
        dim = self.encoder.embed_dim
        feats = [
            encode_batches(self.encoder, [view])[0].reshape(-1, dim)
            for view in tqdm(views, desc="FUNGI support", unit="img", disable=not self.progress)
        ]
        support = torch.cat(feats) if feats else torch.empty(0, dim)
        if len(support) > self.support_size:
            gen = torch.Generator().manual_seed(self.seed)
            keep = torch.randperm(len(support), generator=gen)[: self.support_size]
            support = support[torch.sort(keep).values]
        self.dense.fit(support)
        return self

    def transform(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``B`` views ``(3, H, W)`` → ``B`` maps ``(h, w, 2·D)``, L2-normalised."""
        return self.dense.transform_patches(views)

    def identity(self) -> dict[str, Any]:
        d = self.dense
        return {
            "name": "fungi",
            "support_size": self.support_size,
            "layer": d.layer,
            "num_neighbors": d.num_neighbors,
            "head_dim": d.head_dim,
            "temperature": d.temperature,
        }

    def state(self) -> dict[str, torch.Tensor]:
        return {SUPPORT: self.dense.support_}

    def load_state(self, state: dict[str, torch.Tensor]) -> FungiFeatures:
        if SUPPORT not in state:
            raise BankError("this is a FUNGI bank without its support set; rebuild it")
        self.dense.fit(state[SUPPORT])
        return self
