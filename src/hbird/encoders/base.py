"""The encoder contract every backend implements.

An encoder is a frozen ``nn.Module`` that maps normalised images ``(B, 3, H, W)`` to a
grid of patch features ``(B, h, w, D)`` with ``h = H // patch_size``. Prefix tokens
(CLS, registers) are dropped; position embeddings are interpolated so any ``H, W`` that
is a multiple of the patch size works.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch import nn

from hbird.errors import InputError, spell

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Layers = int | Sequence[int] | None


class Encoder(nn.Module):
    """Base class: subclasses set the attributes below and implement ``_forward_layers``.

    Attributes:
        name: registry name (``"vit_small_patch14_dinov2.lvd142m"``, ``"test_vit"``...).
        patch_size: side of a square patch in pixels.
        embed_dim: width ``D`` of one layer's features.
        num_blocks: number of transformer blocks (valid layer indices are
            ``-num_blocks .. num_blocks - 1``).
        mean, std: the normalisation the weights were trained with (RGB, [0, 1] scale).
        weights_source: where the weights came from (``"random"``, a file path, a hub id).
    """

    name: str
    patch_size: int
    embed_dim: int
    num_blocks: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = "random"

    # -- to implement ------------------------------------------------------------------
    def _forward_layers(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """Normalised ``(B, 3, H, W)`` → one ``(B, h, w, D)`` tensor per requested layer.

        ``layers`` holds non-negative block indices; the last block's output has the
        final norm applied (as the model's own ``forward_features`` would).
        """
        raise NotImplementedError

    # -- shared behaviour --------------------------------------------------------------
    def resolve_layers(self, layers: Layers) -> list[int]:
        """``None`` → last block; negative indices count from the end; validated."""
        if layers is None:
            return [self.num_blocks - 1]
        items = [layers] if isinstance(layers, int) else list(layers)
        if not items:
            raise ValueError("layers must name at least one block")
        out = []
        for i in items:
            j = i + self.num_blocks if i < 0 else i
            if not 0 <= j < self.num_blocks:
                raise InputError(
                    f"layer {i} is out of range: {self.name} has {self.num_blocks} blocks "
                    f"(0 to {self.num_blocks - 1}, or -1 for the last); check {spell('layers')}"
                )
            out.append(j)
        return out

    def feature_dim(self, layers: Layers = None) -> int:
        """Width of ``forward_patches`` output for these layers (concatenated)."""
        return self.embed_dim * len(self.resolve_layers(layers))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised with this encoder's mean and std."""
        return normalize_images(images, self.mean, self.std)

    def forward_patches(self, x: torch.Tensor, layers: Layers = None) -> torch.Tensor:
        """Normalised ``(B, 3, H, W)`` → ``(B, h, w, D · len(layers))`` patch features."""
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                "resize with hbird.data.transforms.resize_for_encoder first"
            )
        feats = self._forward_layers(x, self.resolve_layers(layers))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def forward(self, x: torch.Tensor, layers: Layers = None) -> torch.Tensor:
        return self.forward_patches(x, layers)

    def identity(self) -> dict[str, str]:
        """What a memory bank records to refuse being searched with another encoder.

        ``config_hash`` covers the architecture and the normalisation (``mean``, ``std``,
        also given as they are); ``weights_hash`` the parameter values (a hash of a fixed
        sample of every tensor, cheap even for ViT-g).
        """
        config = {
            "name": self.name,
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "num_blocks": self.num_blocks,
            "mean": list(self.mean),
            "std": list(self.std),
        }
        return identity_record(self, config)


def identity_record(module: nn.Module, config: dict) -> dict:
    """``name``, ``config_hash`` (of ``config`` plus every parameter's shape),
    ``weights_hash``, ``mean`` and ``std`` of a frozen model; ``config`` holds at least
    ``name``, ``mean`` and ``std``."""
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    return {
        "name": config["name"],
        "config_hash": config_hash({**config, "params": shapes}),
        "weights_hash": weights_hash(module),
        "mean": list(config["mean"]),
        "std": list(config["std"]),
    }


def config_hash(config: dict) -> str:
    """16 hex digits of the SHA-256 of ``config`` as sorted JSON."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def weights_hash(module: nn.Module) -> str:
    """16 hex digits hashing a fixed sample of every tensor of ``module``'s state (cheap
    even for ViT-g); models with other parameter values get other hashes."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        flat = value.detach().reshape(-1)
        step = max(1, flat.numel() // 4096)
        sample = flat[::step].to(torch.float64).cpu().numpy()
        digest.update(key.encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def normalize_images(images: torch.Tensor, mean, std) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(images - mean) / std`` with RGB ``mean`` and ``std``."""
    mean = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
