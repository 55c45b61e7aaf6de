"""Named FUNGI settings: ``"paper"`` (the default), ``"paper_bf16"`` and ``"fast"``.

``paper`` is FUNGI's Table 17 (appendix B.1) and the authors' code (fungivision), at the
input side ``S`` (224 in the paper):

=========================  =======================================  ===========================
setting                    ``paper``                                ``fast``
=========================  =======================================  ===========================
canvas (``resize``)        resize to 256/224·S square, KL view and  short side to S, centre
                           embedding its central S × S (code)       crop: one S × S square
DINO local crops           S × S (Table 17: 224 × 224)              96/224 · S (DINO's 96)
DINO crop boxes            drawn per image (code)                   one set for every image
DINO interpolation         bicubic (code)                           bilinear
SimCLR patches             S/2, stride int(S/12), each resized to   S/2 at their own size,
                           S × S bicubic (B.1, code)                offsets spread over 0..S/2
SimCLR negatives           256 inputs (Table 17: 256 × 49)          64 inputs (64 × 49)
=========================  =======================================  ===========================

For texts, ``paper`` is FUNGI's Table 19 (appendix B.3):

=========================  =======================================  ===========================
setting                    ``paper``                                ``fast``
=========================  =======================================  ===========================
SimCLR positive views      12 word deletions (p = 0.1)              8
SimCLR negative views      2 per negative text                      8 per negative text
SimCLR head                256                                      96
SimCLR negatives           256 inputs (256 × 2)                     64 inputs (64 × 8)
=========================  =======================================  ===========================

``paper_bf16`` is ``paper`` with the model's forward passes under bf16 autocast (the
heads, losses, gradients and projection stay float32): the same views and work, about
2× faster on a CPU with bf16 units, with features that differ from ``paper``'s by the
bf16 rounding of the forward passes (measured in docs/fungi.md; cosine to float32 above
0.9999 per part on timm's ViT-S/16). An explicit ``autocast`` overrides its bf16.

``fast`` is what hbird did before the paper settings became the default, so numbers
computed under it are those of earlier hbird versions. Everything else (heads,
temperatures, crop counts and scales, 49 patches; for texts KL's head 768 and
temperature 15, SimCLR's temperature 0.07 and p = 0.1) is the paper's in both.
"""

from __future__ import annotations

from typing import Any

from hbird.fungi.backbones import FungiBackbone
from hbird.fungi.views import snap_to_patch

PRESETS = ("paper", "fast", "paper_bf16")
PRESET_AUTOCAST = {"paper_bf16": "bf16"}
"""Autocast of the model's forward passes under each preset (absent: full precision)."""
FAST_LOCAL_FRACTION = 96 / 224
"""``fast``: DINO's local crop side relative to the input side (DINO's 96 for 224)."""
FAST_NEGATIVE_INPUTS = 64
"""``fast``: training inputs whose views form the SimCLR negative batch."""
FAST_TEXT_SIMCLR = {"text_views": 8, "text_negative_views": 8, "head_dim": 96}
"""``fast``: SimCLR's text views and head before Table 19's became the default."""


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"unknown FUNGI preset {preset!r}; choose among {', '.join(PRESETS)}")


def preset_resize(preset: str) -> str:
    """How images are brought to the canvas under ``preset`` (``ImageBackbone(resize=)``)."""
    check_preset(preset)
    return "short-side" if preset == "fast" else "square"


def preset_autocast(preset: str) -> str | None:
    """The autocast name ``preset`` runs the model's forward passes under (``None``: float32)."""
    check_preset(preset)
    return PRESET_AUTOCAST.get(preset)


def preset_loss_options(preset: str, backbone: FungiBackbone) -> dict[str, dict[str, Any]]:
    """Per-loss keyword arguments of ``preset`` for ``backbone`` (``{}``: the losses' defaults,
    which are the paper's)."""
    check_preset(preset)
    if preset != "fast":
        return {}
    options: dict[str, dict[str, Any]] = {"simclr": {"num_negative_inputs": FAST_NEGATIVE_INPUTS}}
    if backbone.modality == "image":
        side, patch = backbone.image_size, backbone.patch_size
        options["dino"] = {
            "local_size": snap_to_patch(side * FAST_LOCAL_FRACTION, patch),
            "boxes": "shared",
            "interpolation": "bilinear",
        }
        options["simclr"].update(grid="spread", view_size=snap_to_patch(side * 0.5, patch))
    elif backbone.modality == "text":
        options["simclr"].update(FAST_TEXT_SIMCLR)
    return options
