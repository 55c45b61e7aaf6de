"""open_clip models (any model name) behind the CLIP protocol; needs the ``clip`` extra.

Weights (``weights=``): a local checkpoint file (``.pt``, ``.bin``, ``.safetensors``),
a local folder holding ``open_clip_config.json`` and its weights, or one of the model's
published tags (``"openai"``, ``"laion2b_s34b_b79k"``...) fetched from the hub when
online. ``weights=None`` with ``pretrained=True`` takes the model's first published tag;
``pretrained=False`` builds random weights (tests). ResNet models (``RN50``, ``RN50x16``)
also give MaskCLIP dense embeddings (:mod:`hbird.zeroshot.clip.maskclip`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from hbird._optional import require
from hbird.errors import HbirdError, InputError
from hbird.zeroshot.clip.base import ClipModel
from hbird.zeroshot.clip.maskclip import resnet_dense


class ClipWeightsError(HbirdError):
    """A CLIP model's weights are neither local nor downloadable."""


def _open_clip():
    return require("open_clip", "open_clip CLIP models")


def _image_size(visual) -> int:
    size = getattr(visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class OpenClipModel(ClipModel):
    """An open_clip ``CLIP`` model; dense embeddings for ``ModifiedResNet`` towers."""

    def __init__(self, model, tokenizer, name: str, weights_source: str) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.name, self.weights_source = name, weights_source
        visual = model.visual
        self.image_size = _image_size(visual)
        cfg = getattr(visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(float(v) for v in cfg.get("mean", self.mean))
        self.std = tuple(float(v) for v in cfg.get("std", self.std))
        probe = self.tokenizer(["a"])
        with torch.no_grad():
            self.embed_dim = int(model.encode_text(probe).shape[-1])
        self.has_dense = type(visual).__name__ == "ModifiedResNet"

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self._device()))

    def _encode_dense(self, x: torch.Tensor) -> torch.Tensor:
        if not self.has_dense:
            return super()._encode_dense(x)
        return resnet_dense(self.model.visual, x)


def _weights_help(name: str, tag: str) -> str:
    return (
        f"the {tag!r} weights of CLIP {name} are not in the local cache and cannot be "
        "downloaded (the hub is offline or unreachable). Give a local checkpoint file or "
        "folder with --clip-weights FILE (Python: clip_weights=), or run once online to "
        "cache them"
    )


def create_open_clip(
    name: str, weights: str | Path | None = None, pretrained: bool = True, device="cpu"
) -> OpenClipModel:
    """An open_clip model by name (``"ViT-B-32"``, ``"RN50x16"``...; ``open_clip:`` prefix allowed)."""
    open_clip = _open_clip()
    arch = name.removeprefix("open_clip:")
    path = Path(weights) if weights is not None else None
    if path is not None and path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise InputError(
                f"CLIP weights folder {path} has no open_clip_config.json; give the checkpoint "
                "file itself, or a folder saved by open_clip"
            )
        model = open_clip.create_model(f"local-dir:{path}", device=device)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        return OpenClipModel(model.eval(), tokenizer, name, str(path.resolve()))
    if arch not in open_clip.list_models():
        raise InputError(
            f"unknown open_clip model {arch!r}; open_clip knows e.g. "
            f"{', '.join(open_clip.list_models()[:6])}... (open_clip.list_models())"
        )
    tokenizer = open_clip.get_tokenizer(arch)
    if path is not None and path.suffix and not path.is_file():
        raise InputError(f"CLIP weights file {path} does not exist; check --clip-weights")
    if path is not None and path.is_file():
        model = open_clip.create_model(arch, pretrained=str(path), device=device)
        return OpenClipModel(model.eval(), tokenizer, name, str(path.resolve()))
    if not pretrained and weights is None:
        model = open_clip.create_model(arch, device=device)
        return OpenClipModel(model.eval(), tokenizer, name, "random")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    tag = str(weights) if weights is not None else (tags[0] if tags else None)
    if tag not in tags:
        raise InputError(
            f"CLIP weights {weights!r} for {arch} are neither a local file or folder nor one "
            f"of its published tags ({', '.join(tags) or 'none'})"
        )
    from hbird.encoders.hub import WeightsUnavailableError, published_weights

    try:
        with published_weights(f"{arch}:{tag}"):
            model = open_clip.create_model(arch, pretrained=tag, device=device)
    except (WeightsUnavailableError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not str(err).startswith("Failed to download"):
            raise
        raise ClipWeightsError(_weights_help(arch, tag)) from None
    return OpenClipModel(model.eval(), tokenizer, name, tag)
