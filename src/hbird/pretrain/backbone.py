"""The network being pretrained, behind one Backbone protocol.

A backbone maps normalised images ``(B, 3, H, W)`` to a :class:`BackboneOutput`: a global
embedding ``(B, D)`` and patches ``(B, h, w, D)``. Two kinds exist:

* :class:`ViTBackbone`: a timm ViT (its class token is the global embedding); it alone
  can replace masked patch embeddings by a mask token (``supports_masking``, iBOT);
* :class:`FeatureMapBackbone`: any registered non-ViT encoder (ELASTIC, Axial-ResNet, ...)
  trained through its ``forward_patches`` at its output stride; the global embedding is
  the patch mean. Its batch norms become global-batch ones (:class:`GlobalBatchNorm2d`,
  and :func:`globalize_axial_norms` for the axial layers' channels-last and sliced norms;
  same state dicts), so a DDP run normalises over the global batch as one process would.

Every backbone has ``model`` (the module whose untouched state dict a checkpoint exports,
so it loads through ``hbird.encoders.create_encoder(arch, weights=...)``), ``arch``,
``model_kwargs``, ``patch_size``, ``embed_dim``, ``size_multiple`` (crop sides must be a
multiple of it), ``normalize``, ``metadata()`` and ``frozen_encoder()`` (a frozen copy for
the online retrieval probe). Training-only parameters (iBOT's mask token, heads) live in
the objectives.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from hbird.encoders.timm_backend import build_timm_model, timm_mean_std
from hbird.io.checkpoints import architecture_metadata
from hbird.nn.axial import AxialAttention, ChannelsLastBatchNorm, local_batch_norm_slice
from hbird.pretrain.distributed import (
    GlobalBatchNorm1d,
    GlobalBatchNorm2d,
    global_batch_norm,
    is_distributed,
)


@dataclass
class BackboneOutput:
    """Final-norm tokens of one forward pass.

    Attributes:
        cls: ``(B, D)`` the class token, or the patch mean for models without one.
        patches: ``(B, h, w, D)`` patch tokens (registers and other prefix tokens dropped).
    """

    cls: torch.Tensor
    patches: torch.Tensor

    @property
    def tokens(self) -> torch.Tensor:
        """``(B, h·w, D)`` patch tokens as a sequence."""
        b, h, w, d = self.patches.shape
        return self.patches.reshape(b, h * w, d)


class ViTBackbone(nn.Module):
    """A timm ``VisionTransformer`` (built with ``dynamic_img_size=True``) for pretraining.

    Args:
        model: the timm model; ``self.model.state_dict()`` is what checkpoints export.
        arch: its timm name (``vit_small_patch16_224``).
        model_kwargs: the non-default ``timm.create_model`` options it was built with
            (recorded in checkpoints so the same architecture can be rebuilt).
    """

    supports_masking = True
    size_multiple = 1  # timm crops a partial patch away

    def __init__(self, model: nn.Module, arch: str, model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        for attr in ("patch_embed", "_pos_embed", "blocks", "norm"):
            if not hasattr(model, attr):
                raise ValueError(
                    f"{arch} is not a timm VisionTransformer (it lacks {attr}); pretraining "
                    "supports ViT-family timm models such as vit_small_patch16_224"
                )
        self.model = model
        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.embed_dim = int(model.embed_dim)
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0))
        self.has_cls_token = getattr(model, "cls_token", None) is not None
        self.mean, self.std = timm_mean_std(model)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` in [0, 1] → normalised as the encoder registry will at inference."""
        mean = images.new_tensor(self.mean).view(1, 3, 1, 1)
        std = images.new_tensor(self.std).view(1, 3, 1, 1)
        return (images - mean) / std

    def forward(
        self,
        images: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> BackboneOutput:
        """Normalised ``(B, 3, H, W)`` → :class:`BackboneOutput`.

        Args:
            mask: optional ``(B, h, w)`` bool; masked patch embeddings are replaced by
                ``mask_token`` ``(D,)`` before position embeddings are added (iBOT).
        """
        m = self.model
        x = m.patch_embed(images)  # (B, h, w, D) with dynamic_img_size
        if x.ndim != 4:
            raise ValueError(
                f"{self.arch} was not built with dynamic_img_size=True; build it with "
                "build_backbone() so patch embeddings keep their (B, h, w, D) layout"
            )
        b, h, w, d = x.shape
        if mask is not None:
            if mask_token is None:
                raise ValueError("a mask was given without a mask_token to put in its place")
            # torch.where keeps the token in the graph even when nothing is masked (DDP).
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).view(1, 1, 1, d), x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        x = m.norm_pre(x)
        x = m.blocks(x)
        x = m.norm(x)
        patches = x[:, self.num_prefix_tokens :].reshape(b, h, w, d)
        cls = x[:, 0] if self.has_cls_token else patches.mean(dim=(1, 2))
        return BackboneOutput(cls=cls, patches=patches)

    def metadata(self) -> dict[str, str]:
        """String metadata that lets anyone rebuild this architecture (safetensors header)."""
        return architecture_metadata(self.arch, self.model_kwargs, self.mean, self.std)

    def frozen_encoder(self):
        """A frozen float32 copy as a :class:`~hbird.encoders.timm_backend.TimmEncoder`."""
        from hbird.encoders.timm_backend import TimmEncoder

        model = copy.deepcopy(self.model).float().eval().requires_grad_(False)
        return TimmEncoder(model, self.arch)


def _global_slice(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, start: int, stop: int):
    """Channels ``start:stop`` of ``norm`` on ``x`` ``(N, stop - start, ...)``, with training
    statistics over the global batch under DDP (:func:`hbird.nn.axial.batch_norm_slice`).

    The running statistics of the slice are updated in place; ``num_batches_tracked`` is
    not, as in the single-process path (``F.batch_norm``)."""
    if not norm.training or not is_distributed():
        return local_batch_norm_slice(norm, x, start, stop)
    part = slice(start, stop)
    tracked = norm.track_running_stats and norm.running_mean is not None
    view = SimpleNamespace(
        running_mean=norm.running_mean[part] if tracked else None,
        running_var=norm.running_var[part] if tracked else None,
        num_batches_tracked=torch.zeros((), dtype=torch.long),
        weight=norm.weight[part] if norm.affine else None,
        bias=norm.bias[part] if norm.affine else None,
        affine=norm.affine,
        track_running_stats=tracked,
        momentum=norm.momentum,
        eps=norm.eps,
    )
    return global_batch_norm(view, x)


class GlobalChannelsLastBatchNorm(ChannelsLastBatchNorm):
    """:class:`~hbird.nn.axial.ChannelsLastBatchNorm` ``(..., C)`` with global-batch training
    statistics under DDP (itself in one process); also normalises channel slices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not is_distributed():
            return super().forward(x)
        return global_batch_norm(self, x.reshape(-1, x.shape[-1])).reshape(x.shape)

    forward_slice = _global_slice


class GlobalSlicedBatchNorm2d(GlobalBatchNorm2d):
    """:class:`GlobalBatchNorm2d` that also normalises channel slices (an axial layer's
    ``bn_similarity``, applied term by term)."""

    forward_slice = _global_slice


def globalize_axial_norms(module: nn.Module) -> nn.Module:
    """Make the axial layers' batch norms global-batch ones, in place (same state dict).

    Every :class:`~hbird.nn.axial.ChannelsLastBatchNorm` becomes a
    :class:`GlobalChannelsLastBatchNorm` and each :class:`~hbird.nn.axial.AxialAttention`'s
    ``bn_similarity`` a :class:`GlobalSlicedBatchNorm2d`: subclasses without new state, so
    the instances are retyped and keep their parameters and buffers.
    """
    for sub in module.modules():
        if type(sub) is ChannelsLastBatchNorm:
            sub.__class__ = GlobalChannelsLastBatchNorm
        elif isinstance(sub, AxialAttention) and type(sub.bn_similarity) is nn.BatchNorm2d:
            sub.bn_similarity.__class__ = GlobalSlicedBatchNorm2d
    return module


GLOBAL_NORMS = (GlobalBatchNorm1d, GlobalBatchNorm2d, GlobalChannelsLastBatchNorm)
"""The norm classes whose training statistics cover the global batch under DDP
(:class:`GlobalSlicedBatchNorm2d` is a :class:`GlobalBatchNorm2d`)."""


def globalize_norms(module: nn.Module) -> nn.Module:
    """Every ``BatchNorm2d`` and axial-layer norm of ``module`` made a global-batch one
    (:func:`globalize_axial_norms`, then :meth:`GlobalBatchNorm2d.convert`; same state
    dict). Returns the converted module (a bare ``BatchNorm2d`` is replaced, not edited)."""
    return GlobalBatchNorm2d.convert(globalize_axial_norms(module))


def local_norms(module: nn.Module) -> list[str]:
    """Names of the batch norms of ``module`` that would use this process's batch alone
    under DDP (none after :func:`globalize_norms` on the networks hbird builds)."""
    return [
        name
        for name, sub in module.named_modules()
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not isinstance(sub, GLOBAL_NORMS)
    ]


class FeatureMapBackbone(nn.Module):
    """A registered feature-map encoder (``forward_patches`` at its output stride), trainable.

    Args:
        encoder: an :class:`~hbird.encoders.Encoder` from ``create_encoder(arch, ...)``;
            its parameters are unfrozen and its batch norms made global-batch ones in
            place (:func:`globalize_norms`).
        arch: its registry name (``test_elastic``); model_kwargs: the factory options.
    """

    supports_masking = False

    def __init__(self, encoder: nn.Module, arch: str, model_kwargs: dict[str, Any] | None = None):
        super().__init__()
        encoder = globalize_norms(encoder)
        self.encoder = encoder.requires_grad_(True)
        self.arch = arch
        self.model_kwargs = dict(model_kwargs or {})
        self.patch_size = int(encoder.patch_size)
        self.size_multiple = self.patch_size
        self.embed_dim = int(encoder.feature_dim())
        self.mean, self.std = tuple(encoder.mean), tuple(encoder.std)

    @property
    def model(self) -> nn.Module:
        """What ``create_encoder(arch, weights=...)`` loads: the encoder's ``model``."""
        return getattr(self.encoder, "model", self.encoder)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.normalize(images)

    def forward(self, images: torch.Tensor) -> BackboneOutput:
        """Normalised ``(B, 3, H, W)`` → patches ``(B, H/s, W/s, D)`` and their mean ``(B, D)``.

        There is no ``mask`` argument: a feature map has no patch tokens to replace.
        """
        patches = self.encoder.forward_patches(images)
        return BackboneOutput(cls=patches.mean(dim=(1, 2)), patches=patches)

    def metadata(self) -> dict[str, str]:
        return architecture_metadata(self.arch, self.model_kwargs, self.mean, self.std)

    def frozen_encoder(self):
        """A frozen float32 copy of the encoder (batch norms in eval mode)."""
        return copy.deepcopy(self.encoder).float().eval().requires_grad_(False)


Backbone = ViTBackbone | FeatureMapBackbone
"""What the objectives train (see the module docstring for the shared protocol)."""


def is_registered_arch(arch: str) -> bool:
    """Whether ``arch`` is a registered encoder name (``test_vit``, ``test_elastic``, ...)
    rather than a timm name; those are built through the encoder registry."""
    from hbird.encoders.registry import ENCODERS

    return arch in ENCODERS


def backbone_for(encoder: nn.Module, arch: str, model_kwargs: dict[str, Any]) -> Backbone:
    """The trainable backbone around a registered encoder: its timm ViT, or its feature maps."""
    from hbird.encoders.timm_backend import TimmEncoder

    if isinstance(encoder, TimmEncoder):
        return ViTBackbone(encoder.model.requires_grad_(True), arch, model_kwargs)
    return FeatureMapBackbone(encoder, arch, model_kwargs)


def build_backbone(
    arch: str,
    model_kwargs: dict[str, Any] | None = None,
    init_weights: str | Path | None = None,
    seed: int | None = None,
) -> Backbone:
    """Build ``arch`` with random weights (or ``init_weights``) for pretraining.

    Args:
        arch: a timm ViT name (``vit_small_patch16_224``) or a registered feature-map
            encoder (``test_elastic``, ``elastic_resnext50``, ``test_axial``, ...).
        model_kwargs: ``timm.create_model`` options, e.g. ``{"img_size": 64,
            "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}``, or a
            registered encoder's factory options.
        init_weights: a local weights file to start from (any layout the encoder
            registry reads).
        seed: fixes the random initialisation without touching the global RNG.
    """
    from hbird.encoders.checkpoints import load_weights

    kwargs = dict(model_kwargs or {})
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        if is_registered_arch(arch):
            from hbird.encoders import create_encoder

            encoder = create_encoder(arch, weights=init_weights, **kwargs)
            return backbone_for(encoder, arch, kwargs)
        model = build_timm_model(arch, **kwargs)
    if init_weights is not None:
        load_weights(model, init_weights, arch=arch)
    return ViTBackbone(model, arch, kwargs)
