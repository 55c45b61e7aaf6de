"""Encoders backed by timm's ViT family (``vit_*``, ``deit*``, ``eva*`` incl. DINOv3).

Models are built with ``dynamic_img_size=True`` so position embeddings are interpolated
to any input size, and with ``num_classes=0`` (no classifier head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbird.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from hbird.encoders.checkpoints import hbird_checkpoint_options, load_weights
from hbird.encoders.hub import published_weights


def timm_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB ``(mean, std)`` a timm model's weights expect (its ``pretrained_cfg``;
    ImageNet's when it has none)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = tuple(float(m) for m in cfg.get("mean", IMAGENET_MEAN))
    return mean, tuple(float(s) for s in cfg.get("std", IMAGENET_STD))


class TimmEncoder(Encoder):
    """A timm patch-token transformer behind the :class:`Encoder` contract.

    Prefix tokens (CLS, distillation and register tokens: ``model.num_prefix_tokens``)
    are dropped; the last block's output gets the model's final norm, as in
    ``model.forward_features``; earlier blocks are returned as they leave the block.
    """

    def __init__(self, model: nn.Module, name: str, weights_source: str = "random") -> None:
        super().__init__()
        missing = [
            a for a in ("patch_embed", "blocks", "forward_intermediates") if not hasattr(model, a)
        ]
        if missing:
            raise ValueError(
                f"{name} is not a ViT-family timm model (it lacks {', '.join(missing)}); "
                "hbird needs a patch-token transformer such as vit_*, deit* or eva* models"
            )
        patch = tuple(model.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(
                f"{name} has non-square patches {patch}; only square patches are supported"
            )
        self.model = model
        self.name = name
        self.patch_size = int(patch[0])
        self.embed_dim = int(model.embed_dim)
        self.num_blocks = len(model.blocks)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.mean, self.std = timm_mean_std(model)
        self.weights_source = weights_source

    def _forward_layers(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → one ``(B, h, w, D)`` per entry of ``layers`` (in that order)."""
        wanted = sorted(set(layers))
        # (B, h·w, D) per wanted block, prefix tokens already split off by timm
        tokens = self.model.forward_intermediates(
            x,
            indices=wanted,
            norm=False,
            stop_early=True,
            output_fmt="NLC",
            intermediates_only=True,
        )
        by_block = dict(zip(wanted, tokens))
        last = self.num_blocks - 1
        if last in by_block:
            by_block[last] = self.model.norm(by_block[last])
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        return [by_block[i].reshape(b, h, w, -1) for i in layers]


def build_timm_model(name: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with a dynamic image size and no classifier head."""
    import timm

    options = {"num_classes": 0, "dynamic_img_size": True, **kwargs}
    try:
        if not pretrained:
            return timm.create_model(name, **options)
        with published_weights(name):
            return timm.create_model(name, pretrained=True, **options)
    except TypeError as err:
        raise ValueError(
            f"timm could not build {name!r} with options {options} ({err}); hbird supports "
            "ViT-family timm models (vit_*, deit*, eva*), which accept dynamic_img_size"
        ) from err


def _pretrained_source(model: nn.Module, name: str) -> str:
    """``"timm:arch.tag"`` naming the pretrained weights timm resolved for ``name``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch, tag = cfg.get("architecture"), cfg.get("tag")
    return f"timm:{arch}.{tag}" if arch and tag else f"timm:{name}"


def create_timm_encoder(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> TimmEncoder:
    """Build the timm model ``name`` (``arch`` or ``arch.tag``) as a :class:`TimmEncoder`.

    Args:
        name: a timm model name, e.g. ``"vit_small_patch14_dinov2.lvd142m"``.
        weights: a local weights file (timm, DINO or DINOv2 layout; see
            :mod:`hbird.encoders.checkpoints`). Excludes ``pretrained``.
        pretrained: let timm fetch its pretrained weights for ``name`` (needs network or
            a populated Hugging Face cache).
        seed: fixes the random initialisation (used as it is when neither ``weights`` nor
            ``pretrained`` is given), so the same name gives the same random weights in
            every process and a bank built on them loads again; the global RNG is
            neither read nor advanced.
        **kwargs: passed to ``timm.create_model`` (e.g. ``img_size=224``).
    """
    if weights is not None and pretrained:
        raise ValueError("pass either weights=<file> or pretrained=True, not both")
    recorded = hbird_checkpoint_options(weights) if weights is not None else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_timm_model(
            name, pretrained=pretrained, **{**recorded.get("model_kwargs", {}), **kwargs}
        )
    source = _pretrained_source(model, name) if pretrained else f"random:seed={seed}"
    if weights is not None:
        load_weights(model, weights, arch=name)
        source = str(Path(weights).resolve())
    encoder = TimmEncoder(model, name, weights_source=source)
    if "mean" in recorded and "std" in recorded:  # the normalisation it was pretrained with
        encoder.mean, encoder.std = tuple(recorded["mean"]), tuple(recorded["std"])
    return encoder
