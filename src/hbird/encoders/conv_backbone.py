"""Feature-map backbones (ResNet-like stages) behind the :class:`~hbird.encoders.Encoder` contract.

A backbone that exposes its stages becomes an encoder through :class:`StagedEncoder`,
and is registered by name with :func:`register_staged`. The protocol
(:class:`StagedBackbone`), all a backbone module needs:

* ``stage_channels: tuple[int, ...]`` — channels ``C_i`` of each stage's output;
* ``stage_strides: tuple[int, ...]`` — input pixels per cell of each stage's output
  (non-decreasing; each divides the last, which is the encoder's ``patch_size``,
  normally 16: the output stride of a DeepLab-style backbone);
* ``forward_stages(x, stages) -> list[Tensor]`` — normalised images ``(B, 3, H, W)``
  → the outputs ``(B, C_i, ⌈H/s_i⌉, ⌈W/s_i⌉)`` (NCHW) of the requested stage indices, in
  the order asked; it may stop after the deepest one asked for.

Optional attributes:

* ``gradient_layer: str`` — path (under the backbone) of an ``nn.Linear`` applied once
  per forward pass to the last stage's tokens ``(B, h·w, C)`` in row-major grid order;
  FUNGI differentiates it by default (without it FUNGI needs ``layer=...``);
* ``convert_state_dict(state_dict) -> state_dict`` — maps foreign checkpoint layouts
  onto the backbone's own keys (its own layout passes through unchanged);
* ``mean``, ``std`` — the normalisation its weights expect (ImageNet's otherwise).

Encoder layers are stage indices (``layers=-1``: the last stage). Several stages are
concatenated on the last stage's grid, earlier (finer) ones average-pooled to it, so
``forward_patches(x, layers)`` is ``(B, H/p, W/p, Σ C_i)``. Weights load from
safetensors or ``.pth`` (``torch.load(weights_only=True)``), ``module.``-style wrapper
prefixes stripped, then ``convert_state_dict``, then strict key and shape checks.

Masked-token and prefix-token machinery (iBOT's objective, ``patch_embed``, CLS tokens)
is ViT-only; the parts of hbird that need it refuse these encoders by name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from hbird.encoders.base import Encoder, Layers
from hbird.encoders.checkpoints import hbird_checkpoint_options, load_weights
from hbird.encoders.hub import WeightsUnavailableError
from hbird.encoders.registry import ENCODERS
from hbird.errors import InputError

PROTOCOL = ("stage_channels", "stage_strides", "forward_stages")


@runtime_checkable
class StagedBackbone(Protocol):
    """What a feature-map backbone exposes (see the module docstring)."""

    stage_channels: tuple[int, ...]
    stage_strides: tuple[int, ...]

    def forward_stages(self, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]: ...


class StagedEncoder(Encoder):
    """A :class:`StagedBackbone` as an encoder: stage outputs on the last stage's grid.

    Args:
        model: the backbone module.
        name: its registry name.
        weights_source: where its weights came from.
    """

    def __init__(self, model: nn.Module, name: str, weights_source: str = "random") -> None:
        super().__init__()
        missing = [a for a in PROTOCOL if not hasattr(model, a)]
        if missing:
            raise ValueError(
                f"{name} ({type(model).__name__}) lacks {', '.join(missing)}; a feature-map "
                "backbone must expose stage_channels, stage_strides and forward_stages "
                "(see hbird.encoders.conv_backbone)"
            )
        strides = tuple(int(s) for s in model.stage_strides)
        if len(strides) != len(model.stage_channels) or any(strides[-1] % s for s in strides):
            raise ValueError(
                f"{name}: stage_strides {strides} must give one stride per stage, each "
                "dividing the last"
            )
        self.model = model
        self.name = name
        self.patch_size = strides[-1]
        self.stage_strides = strides
        self.stage_channels = tuple(int(c) for c in model.stage_channels)
        self.embed_dim = self.stage_channels[-1]
        self.num_blocks = len(strides)
        self.gradient_layer = str(getattr(model, "gradient_layer", ""))
        self.mean = tuple(getattr(model, "mean", self.mean))
        self.std = tuple(getattr(model, "std", self.std))
        self.weights_source = weights_source

    def feature_dim(self, layers: Layers = None) -> int:
        """Width of ``forward_patches``: the channels of the chosen stages, summed."""
        return sum(self.stage_channels[i] for i in self.resolve_layers(layers))

    def _forward_layers(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → one ``(B, H/p, W/p, C_i)`` per entry of ``layers``."""
        wanted = sorted(set(layers))
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        by_stage = {}
        for i, fmap in zip(wanted, self.model.forward_stages(x, wanted)):
            factor = self.patch_size // self.stage_strides[i]
            if factor > 1:
                fmap = F.avg_pool2d(fmap, factor, factor, ceil_mode=True)
            if fmap.shape[-2:] != (h, w):
                raise RuntimeError(
                    f"{self.name}: stage {i} gave a {tuple(fmap.shape[-2:])} map for a "
                    f"{tuple(x.shape[-2:])} input; expected {(h, w)} at stride {self.patch_size}"
                )
            by_stage[i] = fmap.permute(0, 2, 3, 1).contiguous()
        return [by_stage[i] for i in layers]


# -- registration ---------------------------------------------------------------------


def _resolve(builder: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """``"package.module:function"`` → the function (imported on first use)."""
    if callable(builder):
        return builder
    module, _, attr = builder.partition(":")
    return getattr(importlib.import_module(module), attr)


def _drop_unknown_classifier(model: nn.Module, state: dict[str, torch.Tensor]) -> dict:
    """A classifier head in a file (``fc.``, ``head.``, ``classifier.``) the backbone was
    built without is not an error: encoders have no classifier."""
    expected = model.state_dict()
    heads = ("fc.", "head.", "classifier.")
    return {k: v for k, v in state.items() if k in expected or not k.startswith(heads)}


def load_backbone_weights(model: nn.Module, path: str | Path, arch: str) -> None:
    """Load a weights file into a staged backbone (its ``convert_state_dict`` applied).

    Raises:
        InputError: the file does not fit (a converter's complaint, e.g. a missing half of
            an allenai/elastic block, is reported with the file's name).
    """
    convert = getattr(model, "convert_state_dict", dict)

    def converted(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        try:
            return _drop_unknown_classifier(model, convert(state))
        except ValueError as err:
            raise InputError(f"weights file {path} does not fit {arch}: {err}") from None

    load_weights(
        model,
        path,
        arch=arch,
        convert=converted,
        hint=f"Check that the encoder name matches the checkpoint's architecture and width "
        f"(`hbird encoders '{arch.split('_')[0]}*'` lists the registered sizes)",
    )


def register_staged(
    name: str, builder: str | Callable[..., nn.Module], seeded_only: bool = False, **defaults: Any
) -> None:
    """Register ``name`` in ``ENCODERS``, built by ``builder(**defaults, **kwargs)``.

    Args:
        builder: a callable or its ``"module:function"`` path (imported on first use).
        seeded_only: a test model whose seeded weights are all it has (``pretrained``
            is ignored); otherwise ``pretrained`` without ``weights`` is refused, as no
            published weights are downloadable.
        **defaults: builder options (overridden by the caller's and by those an
            ``hbird pretrain`` checkpoint records).
    """

    def create(
        full_name: str,
        weights: str | Path | None = None,
        pretrained: bool = False,
        seed: int = 0,
        **kwargs: Any,
    ) -> StagedEncoder:
        if pretrained and weights is None and not seeded_only:
            raise WeightsUnavailableError(
                f"{full_name} has no downloadable weights: give a local checkpoint with "
                "--weights FILE (Python: weights=; safetensors or .pth, published "
                "checkpoints convert on load, see docs/backbones.md) or use random weights "
                "with --no-pretrained (pretrained=False)"
            )
        recorded = hbird_checkpoint_options(weights) if weights is not None else {}
        options = {**defaults, **recorded.get("model_kwargs", {}), **kwargs}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _resolve(builder)(**options)
        source = f"random:seed={seed}"
        if weights is not None:
            load_backbone_weights(model, weights, arch=full_name)
            source = str(Path(weights).resolve())
        encoder = StagedEncoder(model, full_name, weights_source=source)
        if "mean" in recorded and "std" in recorded:
            encoder.mean, encoder.std = tuple(recorded["mean"]), tuple(recorded["std"])
        return encoder

    ENCODERS.register(name, create)


# -- the axial models (hbird.nn.axial_resnet) -------------------------------------------

for _size in ("s", "m", "l", "xl"):
    register_staged(f"axial_resnet_{_size}", "hbird.nn.axial_resnet:axial_resnet", size=_size)
    register_staged(f"axial_deeplab_{_size}", "hbird.nn.axial_resnet:axial_deeplab", size=_size)
register_staged("test_axial", "hbird.nn.axial_resnet:test_axial", seeded_only=True)

# -- the ELASTIC models (hbird.nn.elastic) ----------------------------------------------

for _arch in ("elastic_resnext50", "selastic_resnext50", "elastic_resnet50"):
    register_staged(_arch, "hbird.nn.elastic:build_elastic", arch=_arch)
register_staged(
    "test_elastic", "hbird.nn.elastic:build_elastic", seeded_only=True, arch="test_elastic"
)
