"""Frozen vision encoders: images ``(B, 3, H, W)`` → patch features ``(B, h, w, D)``.

>>> from hbird.encoders import create_encoder
>>> enc = create_encoder("test_vit")
>>> enc.forward_patches(enc.normalize(images), layers=[-1]).shape   # (B, H/8, W/8, 32)

Names: registered encoders (``list_encoders()``), ``hf:<model id or folder>`` for
Hugging Face models, and any timm ViT-family name (``vit_small_patch14_dinov2.lvd142m``).
"""

from hbird.encoders import conv_backbone as _conv_backbone  # noqa: F401  (axial_*)
from hbird.encoders import hf_backend as _hf_backend  # noqa: F401  (registers "hf:")
from hbird.encoders import test_encoders as _test_encoders  # noqa: F401  (registers test_*)
from hbird.encoders.base import Encoder
from hbird.encoders.inference import encode_batches
from hbird.encoders.registry import (
    ENCODERS,
    UnknownEncoderError,
    check_device,
    create_encoder,
    list_encoders,
)

__all__ = [
    "ENCODERS",
    "Encoder",
    "UnknownEncoderError",
    "check_device",
    "create_encoder",
    "encode_batches",
    "list_encoders",
]
