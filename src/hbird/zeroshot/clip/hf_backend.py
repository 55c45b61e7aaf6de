"""Hugging Face ``CLIPModel`` (ViT towers) behind the CLIP protocol; needs the ``hf`` extra.

Named ``hf:<model id or local folder>``; the folder (or hub repo) holds the model and its
tokenizer. ``get_image_features`` / ``get_text_features`` return a tensor in transformers
4.x and a ``BaseModelOutputWithPooling`` (projected ``pooler_output``) in 5.x; both are
handled. ViT towers have no MaskCLIP path here (``encode_dense`` refuses).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hbird._optional import require
from hbird.zeroshot.clip.base import ClipModel

PREFIX = "hf:"


def projected(output) -> torch.Tensor:
    """The projected embedding from ``get_*_features``: a tensor (transformers 4.x) or
    an output object whose ``pooler_output`` holds it (5.x)."""
    if isinstance(output, torch.Tensor):
        return output
    pooled = getattr(output, "pooler_output", None)
    if pooled is None:
        pooled = output[1] if isinstance(output, tuple) else output["pooler_output"]
    return pooled


def _preprocessor_mean_std(source: str):
    file = Path(source) / "preprocessor_config.json"
    if not file.is_file():
        return None
    cfg = json.loads(file.read_text())
    if "image_mean" in cfg and "image_std" in cfg:
        return tuple(cfg["image_mean"]), tuple(cfg["image_std"])
    return None


class HFClipModel(ClipModel):
    """A ``transformers.CLIPModel`` with its tokenizer."""

    def __init__(self, model, tokenizer, name: str, weights_source: str, mean_std=None) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.name, self.weights_source = name, weights_source
        self.embed_dim = int(model.config.projection_dim)
        self.image_size = int(model.config.vision_config.image_size)
        if mean_std is not None:
            self.mean, self.std = (tuple(float(v) for v in m) for m in mean_std)

    def _encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return projected(self.model.get_image_features(pixel_values=x))

    def _encode_text(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt")
        tokens = {
            k: v.to(device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")
        }
        return projected(self.model.get_text_features(**tokens))


def create_hf_clip(name: str, weights=None, pretrained: bool = True, device="cpu") -> HFClipModel:
    """``hf:<id or folder>`` → :class:`HFClipModel` (``weights`` may name the folder instead)."""
    transformers = require("transformers", "Hugging Face CLIP models")
    source = str(weights) if weights is not None else name.removeprefix(PREFIX)
    from hbird.encoders.hub import published_weights

    with published_weights(source):
        model = transformers.CLIPModel.from_pretrained(source)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    model = model.eval().to(device)
    return HFClipModel(model, tokenizer, name, source, _preprocessor_mean_std(source))
