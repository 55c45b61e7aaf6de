"""Hugging Face ``transformers`` vision backbones, named ``hf:<model id or local folder>``.

Supported model types: ViT (``vit``), DINOv2 (``dinov2``), DINOv2 with registers
(``dinov2_with_registers``) and the vision tower of CLIP (``clip``, ``clip_vision_model``).
Needs the optional ``hf`` extra (``pip install "hbird[hf]"``).

As for timm names, ``pretrained=True`` loads the weights stored at the id or folder and
``pretrained=False`` builds the architecture from its config with random weights.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbird._optional import require
from hbird.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder
from hbird.encoders.hub import HF_WAYS_OUT, published_weights
from hbird.encoders.registry import ENCODERS
from hbird.errors import InputError, spell

PREFIX = "hf:"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class HFFamily:
    """How one ``config.model_type`` maps onto the Encoder contract."""

    final_norm: str  # attribute holding the norm applied to the last block's tokens
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    vision_tower: bool = False  # build CLIPVisionModel (from a full CLIP config too)


FAMILIES: dict[str, HFFamily] = {
    "vit": HFFamily("layernorm", HALF, HALF),
    "dinov2": HFFamily("layernorm", IMAGENET_MEAN, IMAGENET_STD),
    "dinov2_with_registers": HFFamily("layernorm", IMAGENET_MEAN, IMAGENET_STD),
    "clip": HFFamily("post_layernorm", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, vision_tower=True),
    "clip_vision_model": HFFamily(
        "post_layernorm", OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, vision_tower=True
    ),
}


def _find_module(model: nn.Module, attribute: str) -> nn.Module:
    """``model.<attribute>`` or ``model.vision_model.<attribute>`` (transformers versions differ)."""
    for owner in (model, getattr(model, "vision_model", None)):
        if owner is not None and isinstance(getattr(owner, attribute, None), nn.Module):
            return getattr(owner, attribute)
    raise AttributeError(f"{type(model).__name__} has no {attribute!r} module")


class HFEncoder(Encoder):
    """A ``transformers`` ViT-like vision model behind the :class:`Encoder` contract.

    Layers come from ``output_hidden_states`` (block ``i`` is ``hidden_states[i + 1]``);
    the last block's tokens get the model's final norm (``layernorm`` for ViT/DINOv2,
    ``post_layernorm`` for CLIP, matching timm's ``forward_features``). The CLS token
    and any register tokens are dropped.
    """

    def __init__(
        self,
        model: nn.Module,
        name: str,
        family: HFFamily,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        weights_source: str = "random",
    ) -> None:
        super().__init__()
        config = model.config
        patch = config.patch_size
        self.model = model
        self.name = name
        self.patch_size = int(patch if isinstance(patch, int) else patch[0])
        self.embed_dim = int(config.hidden_size)
        self.num_blocks = int(config.num_hidden_layers)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.weights_source = weights_source
        self.final_norm = _find_module(model, family.final_norm)
        accepts = inspect.signature(model.forward).parameters
        self._forward_options = (
            {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}
        )

    def _forward_layers(self, x: torch.Tensor, layers: list[int]) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → one ``(B, h, w, D)`` per entry of ``layers``."""
        out = self.model(pixel_values=x, output_hidden_states=True, **self._forward_options)
        hidden = out.hidden_states  # num_blocks + 1 tensors (B, T, D); [0] = embeddings
        b, _, height, width = x.shape
        h, w = height // self.patch_size, width // self.patch_size
        feats = []
        for i in layers:
            tokens = hidden[i + 1]
            if i == self.num_blocks - 1:
                tokens = self.final_norm(tokens)
            patches = tokens[:, self.num_prefix_tokens :]  # (B, h·w, D)
            if patches.shape[1] != h * w:
                raise RuntimeError(
                    f"{self.name}: expected {h}x{w}={h * w} patch tokens after "
                    f"{self.num_prefix_tokens} prefix tokens, got {patches.shape[1]}"
                )
            feats.append(patches.reshape(b, h, w, -1))
        return feats


def _processor_mean_std(transformers: Any, model_id: str) -> tuple[tuple, tuple] | None:
    """``(image_mean, image_std)`` from the model's image processor config, if it has one."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError, KeyError):
        return None
    mean, std = getattr(processor, "image_mean", None), getattr(processor, "image_std", None)
    if mean is None or std is None:
        return None
    return tuple(mean), tuple(std)


def create_hf_encoder(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    seed: int = 0,
    **kwargs: Any,
) -> HFEncoder:
    """Build ``hf:<model id or folder>`` as an :class:`HFEncoder`.

    Args:
        name: ``"hf:facebook/dinov2-small"``, ``"hf:/path/to/saved_model"``, ...
        weights: not supported; the weights live at the model id or folder.
        pretrained: load the stored weights (otherwise random weights from the config).
        seed: fixes those random weights, as for timm names: the same name gives the same
            weights in every process (and a bank built on them loads again); the global
            RNG is neither read nor advanced.
        **kwargs: passed to ``from_pretrained`` / ``AutoConfig.from_pretrained``
            (e.g. ``revision``, ``cache_dir``).
    """
    transformers = require("transformers", f"the Hugging Face encoder backend ({name})")
    model_id = name[len(PREFIX) :]
    if not model_id:
        raise InputError(
            f"{spell('encoder', 'hf:')} needs a model id or folder after the colon, e.g. "
            f"{spell('encoder', 'hf:facebook/dinov2-small')}"
        )
    if weights is not None:
        raise InputError(
            f"{name}: Hugging Face encoders take their weights from the model id or folder, "
            f"not {spell('weights', weights)}: save the model with save_pretrained and give "
            f"{spell('encoder', 'hf:/path/to/folder')} with {spell('pretrained')}"
        )
    local = Path(model_id).expanduser().is_dir()
    with nullcontext() if local else published_weights(name, HF_WAYS_OUT):
        config = transformers.AutoConfig.from_pretrained(model_id, **kwargs)
        family = FAMILIES.get(config.model_type)
        if family is None:
            raise InputError(
                f"{name} is a {config.model_type!r} model; the hf: backend supports "
                f"{', '.join(sorted(FAMILIES))}. timm may have it: see `hbird encoders`"
            )
        if pretrained:
            model_class = (
                transformers.CLIPVisionModel if family.vision_tower else transformers.AutoModel
            )
            model = model_class.from_pretrained(model_id, **kwargs)
            source = f"hf:{model_id}"
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = (
                    transformers.CLIPVisionModel(getattr(config, "vision_config", config))
                    if family.vision_tower
                    else transformers.AutoModel.from_config(config)
                )
            source = f"random:seed={seed}"
        mean_std = _processor_mean_std(transformers, model_id) or (family.mean, family.std)
    return HFEncoder(model, name, family, *mean_std, weights_source=source)


ENCODERS.register(PREFIX, create_hf_encoder)
