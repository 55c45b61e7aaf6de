"""Zero-shot segmentation by retrieve and co-segment (ReCo; issue 11).

Name the classes, get masks, no labels: CLIP retrieves an archive of images for each
class from an unlabelled collection, co-segmentation of the archive with a frozen image
encoder finds a reference embedding per class, and every pixel of a new image takes the
class whose reference it is closest to.

Rooms: ``clip/`` (CLIP backends behind one protocol, MaskCLIP dense embeddings),
``templates`` (the 85 prompts, ``t_c``), ``cosegment`` (``A``, ``G``, seeds, the pixel
weights, ``S_c``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ClipModel": "hbird.zeroshot.clip",
    "CLIPS": "hbird.zeroshot.clip",
    "create_clip": "hbird.zeroshot.clip",
    "RECO_TEMPLATES": "hbird.zeroshot.templates",
    "text_embeddings": "hbird.zeroshot.templates",
    "cosegment": "hbird.zeroshot.cosegment",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hbird.zeroshot' has no attribute {name!r}")
