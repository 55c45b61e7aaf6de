"""SimCLR (InfoNCE) loss against a fixed negative batch (FUNGI, Table 17).

Positives are views of the same input. For an image (FUNGI appendix B.1 and its code):
the image resized to 224 × 224 (bicubic), 49 overlapping 112-pixel patches (stride
``int(112 / 6) = 18``), each resized to 224 × 224 (bicubic) for the encoder; Table 17:
49 positive views. The ``fast`` preset feeds the patches at 112 pixels, offsets spread
over 0–112. For a text (Table 19, appendix B.3): 12 copies with each word deleted with
p = 0.1. For an audio clip (appendix A.2, Table 12), 16 copies of its filter bank with
uniform noise added and shifted in time by up to 10 frames
(:class:`~hbird.fungi.views.NoiseShift`). Negatives are the views of a fixed batch of
training inputs, embedded once at ``fit`` (Table 17: 256 × 49 for images; Table 19:
256 × 2 for texts; Table 12: 2 views each for audio; ``fast``: 64 inputs); or given.
Embeddings are *not* normalised before the random head (output 96 for images, Table 17;
256 for texts, Table 19; 768 for audio, Table 12); head outputs are compared by cosine
similarity, every similarity divided by the temperature 0.07.

For the ``V`` positives ``a`` of one sample, with ``s(x, y) = cos(x, y) / τ``:

    L = mean_a [ −mean_{b≠a} s(a, b) + log Σ_{c ∈ positives∖{a} ∪ negatives} exp s(a, c) ]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hbird.fungi.heads import RandomHead
from hbird.fungi.losses.base import LOSSES, GradientLoss
from hbird.fungi.views import (
    NoiseShift,
    PatchGrid,
    ViewGroup,
    Views,
    WordDeletion,
    resize_views,
    snap_to_patch,
)
from hbird.io.seeds import make_generator


def info_nce(anchors: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample InfoNCE where the views of a sample are each other's positives.

    Args:
        anchors: ``(B, V, K)`` head outputs of the ``V >= 2`` positive views per sample.
        negatives: ``(N, K)`` shared by every sample, or ``(B, N, K)`` per sample.
        temperature: τ dividing every cosine similarity.

    Returns:
        ``(B,)`` losses (mean over each sample's anchors).
    """
    views = anchors.shape[1]
    if views < 2:
        raise ValueError(f"InfoNCE needs at least 2 positive views per sample, got {views}")
    a = F.normalize(anchors, dim=-1)
    n = F.normalize(negatives, dim=-1)
    scaled = a / temperature  # dividing the (V, D) side is cheaper than the (V, N) scores
    pos = scaled @ a.transpose(1, 2)  # (B, V, V)
    neg = scaled @ (n.T if n.ndim == 2 else n.transpose(1, 2))  # (B, V, N)
    self_pair = torch.eye(views, dtype=torch.bool, device=a.device)
    attract = pos.masked_fill(self_pair, 0.0).sum(dim=-1) / (views - 1)  # (B, V)
    logits = torch.cat([pos.masked_fill(self_pair, float("-inf")), neg], dim=-1)
    return (torch.logsumexp(logits, dim=-1) - attract).mean(dim=-1)


HEAD_DIMS = {"image": 96, "text": 256, "audio": 768}
"""SimCLR head width per modality: Table 17 (images), Table 19 (texts), Table 12 (audio)."""


@LOSSES.register("simclr")
class SimCLRLoss(GradientLoss):
    """InfoNCE between the views of a sample, against a fixed set of negatives.

    Args:
        backbone: the frozen model. seed: the extractor seed.
        head_dim: width of the random head (``None``: the modality's, Table 17's 96 for
            images, Table 19's 256 for texts, Table 12's 768 for audio).
        temperature: τ (Table 17: 0.07).
        num_negative_inputs: training inputs whose views form the negative batch
            (Tables 17 and 19: 256, i.e. 256 × 49 image or 256 × 2 text negative views).
        patch_fraction: image patch side as a fraction of the input side (B.1: 112/224).
        stride_fraction: patch stride as a fraction of the patch side (B.1: 1/6).
        grid: ``"unfold"`` (FUNGI's code) or ``"spread"`` (:class:`~hbird.fungi.views.PatchGrid`).
        view_size: side the patches are resized to for the encoder (default: the input
            side, as FUNGI's code).
        interpolation: ``"bicubic"`` (FUNGI's code) or ``"bilinear"``, for the image and
            the patches.
        text_views: positive views per text (Table 19: 12).
        text_negative_views: views per negative text (Table 19: 2).
        word_deletion: probability of deleting each word of a text view (Table 19: 0.1).
        audio_views: positive views per clip (Table 12: 16), noise-and-shift views of its
            filter bank (:class:`~hbird.fungi.views.NoiseShift`, appendix A.2).
        audio_negative_views: views of each negative clip (Table 12: 2).
        audio_noise, audio_max_shift: eq. 7's noise scale (1/10) and the largest time
            shift in frames (A.2: 10).
        negatives: the negative batch given instead of a seeded choice of training
            inputs: ``(N, D)`` embeddings of negative views, or a sequence of inputs
            whose views are embedded at ``fit``.
    """

    name = "simclr"

    def __init__(
        self,
        backbone: Any,
        seed: int,
        head_dim: int | None = None,
        temperature: float = 0.07,
        num_negative_inputs: int = 256,
        patch_fraction: float = 0.5,
        stride_fraction: float = 1.0 / 6.0,
        grid: str = "unfold",
        view_size: int | None = None,
        interpolation: str = "bicubic",
        text_views: int = 12,
        text_negative_views: int = 2,
        word_deletion: float = 0.1,
        audio_views: int = 16,
        audio_negative_views: int = 2,
        audio_noise: float = 0.1,
        audio_max_shift: int = 10,
        negatives: torch.Tensor | Sequence[Any] | None = None,
    ) -> None:
        super().__init__(backbone, seed)
        if temperature <= 0:
            raise ValueError(f"simclr: temperature must be > 0, got {temperature}")
        if num_negative_inputs < 1:
            raise ValueError(f"simclr: num_negative_inputs must be >= 1, got {num_negative_inputs}")
        self.temperature = temperature
        self.num_negative_inputs = num_negative_inputs
        self.negative_views: NoiseShift | WordDeletion | None = None  # None: the positives'
        if backbone.modality == "image":
            side = backbone.image_size
            patch = snap_to_patch(side * patch_fraction, backbone.patch_size)
            view_size = view_size or side
            if view_size % backbone.patch_size:
                raise ValueError(
                    f"simclr: view_size={view_size} must be a multiple of the patch size "
                    f"{backbone.patch_size}"
                )
            self.image_size = side
            self.views = PatchGrid(side, patch, stride_fraction, grid, view_size, interpolation)
        elif backbone.modality == "audio":
            self.views = NoiseShift(audio_views, audio_noise, audio_max_shift, seed)
            self.negative_views = NoiseShift(
                audio_negative_views, audio_noise, audio_max_shift, seed
            )
        else:
            self.views = WordDeletion(text_views, word_deletion, seed)
            self.negative_views = WordDeletion(text_negative_views, word_deletion, seed)
        if head_dim is None:
            head_dim = HEAD_DIMS[backbone.modality]
        self.head = RandomHead(self.embed_dim, head_dim, seed, "simclr")
        self.register_buffer("negatives", torch.empty(0, self.embed_dim))
        self.given_negatives = negatives
        if isinstance(negatives, torch.Tensor):
            if negatives.ndim != 2 or negatives.shape[1] != self.embed_dim or not len(negatives):
                raise ValueError(
                    f"simclr: given negatives must be (N, {self.embed_dim}) embeddings, "
                    f"got {tuple(negatives.shape)}"
                )
            self.given["negatives"] = f"embeddings {tuple(negatives.shape)}"
        elif negatives is not None:
            self.given["negatives"] = f"{len(negatives)} inputs"
        self.interpolation = interpolation
        self.settings = {
            "head_dim": head_dim,
            "temperature": temperature,
            "num_negative_inputs": num_negative_inputs,
            "patch_fraction": patch_fraction,
            "stride_fraction": stride_fraction,
            "grid": grid,
            "view_size": view_size,
            "interpolation": interpolation,
            "text_views": text_views,
            "text_negative_views": text_negative_views,
            "word_deletion": word_deletion,
            "audio_views": audio_views,
            "audio_negative_views": audio_negative_views,
            "audio_noise": audio_noise,
            "audio_max_shift": audio_max_shift,
        }

    def make_views(self, batch: Views) -> list[ViewGroup]:
        """Images: canvases ``(B, 3, C, C)`` resized to the input side, then patched;
        audio: filter banks ``(B, T, F)``, noised and shifted; texts: word deletions."""
        if isinstance(self.views, PatchGrid):
            batch = resize_views(batch, self.image_size, self.interpolation)
        return self.views(batch)

    def make_negative_views(self, batch: Views) -> list[ViewGroup]:
        """The views of negative inputs: the positives' kind, fewer for texts and audio (Tables 19, 12)."""
        if self.negative_views is not None:
            return self.negative_views(batch)
        return self.make_views(batch)

    def fit(self, backbone: Any, inputs: Sequence[Any], batch_size: int) -> None:
        """Embed the views of the negatives: the given ones, or a seeded choice of
        ``num_negative_inputs`` training inputs."""
        given = self.given_negatives
        if isinstance(given, torch.Tensor):
            self.negatives = given.detach().to(device=backbone.device, dtype=backbone.dtype)
            return
        if given is not None:
            chosen = list(given)
        else:
            if len(inputs) == 0:
                raise ValueError("simclr: fit needs at least one training input for the negatives")
            gen = make_generator(self.seed, "simclr.negatives")
            order = torch.randperm(len(inputs), generator=gen)
            chosen = [inputs[int(i)] for i in order[: self.num_negative_inputs]]
        parts = []
        with torch.no_grad():
            for start in range(0, len(chosen), batch_size):
                batch = backbone.prepare(chosen[start : start + batch_size])
                for group in self.make_negative_views(batch):
                    parts.append(backbone.embed(group.views))
        self.negatives = torch.cat(parts).to(device=backbone.device)  # (N·V, D)

    def forward(self, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """``[(B, V, D)]`` → ``(B,)``."""
        if self.negatives.shape[0] == 0:
            raise RuntimeError(
                "simclr: no negatives yet; fit the extractor on training inputs first"
            )
        z = embeddings[0]
        negatives = self.head(self.negatives.to(device=z.device, dtype=z.dtype))
        return info_nce(self.head(z), negatives, self.temperature)
