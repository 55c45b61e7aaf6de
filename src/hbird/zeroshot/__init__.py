"""Zero-shot segmentation by retrieve and co-segment (ReCo; issue 11).

Name the classes, get masks, no labels: CLIP retrieves an archive of images for each
class from an unlabelled collection, co-segmentation of the archive with a frozen image
encoder finds a reference embedding per class, and every pixel of a new image takes the
class whose reference it is closest to.

>>> from hbird.zeroshot import ImageCollection, ReCo
>>> coll = ImageCollection.build("photos/", "ViT-L-14-336", "coll/", clip_weights="ViT-L-14-336.pt")
>>> reco = ReCo(collection=coll, encoder="deit_small_distilled_patch16_224",
...             dense_clip="RN50x16", dense_clip_weights="RN50x16.pt").build(["road", "sky"])
>>> masks = reco.predict(images)  # (H, W) class ids at each image's own size

Modules: ``clip/`` (CLIP backends behind one protocol, MaskCLIP dense embeddings),
``templates`` (the 85 prompts, ``t_c``), ``cosegment`` (``A``, ``G``, seeds, the pixel
weights, ``S_c``), ``collection`` (the CLIP index of an unlabelled folder), ``reco``
(``ReCo``), ``toy`` (a world where all of it can succeed or fail, for tests).
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
    "ImageCollection": "hbird.zeroshot.collection",
    "ReCo": "hbird.zeroshot.reco",
    "ReCoSettings": "hbird.zeroshot.reco",
    "dense_clip_scores": "hbird.zeroshot.reco",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'hbird.zeroshot' has no attribute {name!r}")
