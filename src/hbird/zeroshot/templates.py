"""The 85 prompt templates of ReCo's text embedding (issue 11, step 1; supplement B.2).

The 80 CLIP ImageNet templates (Radford et al. 2021, the published prompt-engineering
list) plus the five scene templates DenseCLIP/MaskCLIP (Zhou et al. 2021) added.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

CLIP_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

SCENE_TEMPLATES: tuple[str, ...] = (
    "there is a {} in the scene.",
    "there is the {} in the scene.",
    "this is a {} in the scene.",
    "this is the {} in the scene.",
    "this is one {} in the scene.",
)

RECO_TEMPLATES: tuple[str, ...] = CLIP_IMAGENET_TEMPLATES + SCENE_TEMPLATES
"""ReCo's 85 templates: the 80 CLIP ImageNet ones, then the 5 scene ones."""


def prompt_name(name: str, renames: Mapping[str, str] | None = None) -> str:
    """The words a class is prompted with: its rename (``parking`` → ``parking lot``) or itself."""
    return (renames or {}).get(name, name)


def text_embeddings(
    clip, names: Sequence[str], templates: Sequence[str] = RECO_TEMPLATES
) -> torch.Tensor:
    """``t_c`` for each name, ``(C, E)``: the mean of the L2-normalised CLIP text embeddings
    of the name in every template, normalised again (issue 11, step 1)."""
    rows = []
    for name in names:
        prompts = [t.format(name) for t in templates]
        emb = torch.nn.functional.normalize(clip.encode_text(prompts).float(), dim=-1)
        rows.append(torch.nn.functional.normalize(emb.mean(0), dim=0))
    return torch.stack(rows) if rows else torch.empty(0, clip.embed_dim)
