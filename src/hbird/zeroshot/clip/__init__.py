"""CLIP backends behind one protocol (:class:`ClipModel`): ``encode_image``,
``encode_text``, ``encode_dense`` and ``identity``.

=======================  =============================================  ===============
name                     backend                                        needs
=======================  =============================================  ===============
``test_clip``            tiny seeded random CLIP (tests)                torch
``toy_clip``             the toy world's colour CLIP (``zeroshot.toy``)  torch
``hf:<id or folder>``    Hugging Face ``CLIPModel`` (ViT towers)        ``hbird[hf]``
any open_clip name       ``ViT-L-14-336``, ``RN50x16``... (dense: RN*)   ``hbird[clip]``
=======================  =============================================  ===============
"""

from __future__ import annotations

from pathlib import Path

import torch

from hbird.encoders.registry import check_device
from hbird.registry import Registry
from hbird.zeroshot.clip.base import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipModel,
    clip_resize_crop,
)
from hbird.zeroshot.clip.test_clip import TestClip, create_test_clip

__all__ = [
    "CLIPS",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "ClipModel",
    "TestClip",
    "clip_resize_crop",
    "create_clip",
]

CLIPS: Registry = Registry("CLIP model")
"""Registered CLIP factories ``factory(name, weights=None, **kwargs) -> ClipModel``;
``hf:`` names and every other name (open_clip) are resolved by :func:`create_clip`."""
CLIPS.register("test_clip", create_test_clip)


def _create_toy_clip(name: str, weights=None, **kwargs) -> ClipModel:
    from hbird.zeroshot.toy import ToyClip

    return ToyClip(**kwargs)


CLIPS.register("toy_clip", _create_toy_clip)


def create_clip(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = True,
    device: str | torch.device = "cpu",
    **kwargs,
) -> ClipModel:
    """A frozen CLIP model: a registered name, ``hf:<id or folder>``, or an open_clip name.

    Args:
        weights: a local checkpoint file or folder (or, for open_clip, a published tag).
        pretrained: without ``weights``, fetch the published weights (open_clip: the
            model's first tag) when online; False builds random weights.
    """
    dev = check_device(device)
    if name in CLIPS:
        model = CLIPS.create(name, name, weights=weights, **kwargs)
    elif name.startswith("hf:"):
        from hbird.zeroshot.clip.hf_backend import create_hf_clip

        model = create_hf_clip(name, weights, pretrained=pretrained, device=dev)
    else:
        from hbird.zeroshot.clip.open_clip_backend import create_open_clip

        model = create_open_clip(name, weights, pretrained=pretrained, device=dev)
    model.requires_grad_(False)
    return model.eval().to(dev)
