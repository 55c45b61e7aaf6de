"""Seeded tiny Hugging Face vision models saved to a folder, for the ``hf:`` tests."""

from __future__ import annotations

from pathlib import Path

import torch

SMALL = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


def save_tiny(folder: Path, kind: str) -> torch.nn.Module:
    """Build a seeded tiny model of ``kind``, save it to ``folder``, return it in eval mode."""
    import transformers

    torch.manual_seed(0)
    if kind == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(intermediate_size=64, **SMALL))
    elif kind == "dinov2":
        model = transformers.Dinov2Model(transformers.Dinov2Config(mlp_ratio=2, **SMALL))
    elif kind == "dinov2_reg":
        config = transformers.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **SMALL)
        model = transformers.Dinov2WithRegistersModel(config)
    elif kind == "clip_vision":
        model = transformers.CLIPVisionModel(
            transformers.CLIPVisionConfig(intermediate_size=64, **SMALL)
        )
    elif kind == "clip":
        text = {
            "vocab_size": 99,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        }
        config = transformers.CLIPConfig(
            text_config=text, vision_config={"intermediate_size": 64, **SMALL}, projection_dim=16
        )
        model = transformers.CLIPModel(config)
    else:
        raise ValueError(kind)
    model.save_pretrained(folder)
    return model.eval()
