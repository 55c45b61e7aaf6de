"""The CLIP protocol ReCo needs (issue 11, "CLIP backends"), and CLIP's own preprocessing.

A CLIP model here is a frozen ``nn.Module`` with four calls:

* ``encode_image(x (B, 3, S, S)) -> (B, E)``: L2-normalised image embeddings of images
  already through :meth:`ClipModel.preprocess` (``S = image_size``);
* ``encode_text(prompts: list[str]) -> (T, E)``: L2-normalised text embeddings;
* ``encode_dense(x (B, 3, H, W)) -> (B, h, w, E)``: L2-normalised embeddings at every
  location (DenseCLIP / MaskCLIP), ``x`` normalised with :meth:`ClipModel.normalize`;
  backends without a dense path raise :class:`~hbird.errors.InputError`;
* ``identity() -> dict``: name, config hash, weights hash, preprocessing — what a saved
  collection or reference set records to refuse another CLIP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hbird.encoders.base import identity_record, normalize_images
from hbird.encoders.hf_backend import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from hbird.errors import InputError


def clip_resize_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """CLIP's geometry: ``(3, H, W)`` in [0, 1] → ``(3, size, size)``: bicubic resize
    (antialiased) so the short side is ``size``, then the centre crop, clamped to [0, 1]."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise InputError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    height, width = image.shape[-2:]
    short, long = sorted((height, width))
    long = int(size * long / short)  # torchvision's Resize(int) rounding
    new = (size, long) if height <= width else (long, size)
    x = image[None].float()
    if tuple(x.shape[-2:]) != new:
        x = F.interpolate(x, size=new, mode="bicubic", align_corners=False, antialias=True)
    top, left = (new[0] - size) // 2, (new[1] - size) // 2
    return x[0, :, top : top + size, left : left + size].clamp(0.0, 1.0)


class ClipModel(nn.Module):
    """Base class of the CLIP backends; subclasses implement the ``_encode_*`` methods.

    Attributes:
        name: what the model was created as (``"test_clip"``, ``"ViT-B-32"``, ``"hf:..."``).
        embed_dim: ``E``, the joint embedding width.
        image_size: ``S``, the side :meth:`preprocess` crops to.
        mean, std: the image normalisation the weights were trained with.
        weights_source: where the weights came from (``"random"``, a file, a hub tag).
    """

    name: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    weights_source: str = "random"
    has_dense: bool = False

    # -- to implement ------------------------------------------------------------------
    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def _encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        raise InputError(
            f"CLIP {self.name} has no dense (DenseCLIP/MaskCLIP) path; it needs a CLIP "
            "ResNet such as open_clip's RN50 or RN50x16 (dense_clip=...)"
        )

    # -- the protocol ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's tensors live (the CPU for a model without any)."""
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised with this CLIP's mean and std."""
        return normalize_images(images, self.mean, self.std)

    def preprocess(self, image: torch.Tensor) -> torch.Tensor:
        """CLIP's preprocessing of one ``(3, H, W)`` image in [0, 1] → ``(3, S, S)``
        normalised: bicubic short-side resize, centre crop, mean/std."""
        return self.normalize(clip_resize_crop(image, self.image_size)[None])[0]

    @torch.no_grad()
    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed ``(B, 3, S, S)`` → ``(B, E)`` L2-normalised float32."""
        return F.normalize(self._encode_image(x).float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``T`` prompts → ``(T, E)`` L2-normalised float32."""
        return F.normalize(self._encode_text(list(prompts)).float(), dim=-1)

    @torch.no_grad()
    def encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` → ``(B, h, w, E)`` L2-normalised float32."""
        return F.normalize(self._encode_dense(x).float(), dim=-1)

    def identity(self) -> dict[str, str]:
        config = {
            "name": self.name,
            "embed_dim": self.embed_dim,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        record = identity_record(self, config)
        return {**record, "image_size": self.image_size, "weights_source": self.weights_source}
