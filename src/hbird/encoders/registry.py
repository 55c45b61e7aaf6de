"""The encoder registry and name resolution.

A name is resolved in this order:

1. a registered name (``test_vit``, the project's own models, ...);
2. a registered prefix ending in ``:`` (``hf:facebook/dinov2-small`` → the ``hf:`` entry);
3. any timm model name, with an optional pretrained tag
   (``vit_small_patch14_dinov2.lvd142m``, ``vit_small_patch16_224.dino``).

Every registry entry is a factory called as
``factory(name, weights=..., pretrained=..., **kwargs) -> Encoder`` with the full name.
"""

from __future__ import annotations

import difflib
import fnmatch
from pathlib import Path
from typing import Any

import torch

from hbird.encoders.base import Encoder
from hbird.encoders.normalization import with_normalize
from hbird.errors import HbirdError, InputError, spell
from hbird.registry import Registry

ENCODERS: Registry = Registry("encoder")

TIMM_FAMILIES = ("vit_*", "eva*", "deit*")


class UnknownEncoderError(HbirdError, ValueError):
    """The name is neither registered nor a timm model."""


def _registered_entry(name: str) -> str | None:
    """The registry key serving ``name``: the name itself or its ``prefix:``."""
    if name in ENCODERS:
        return name
    if ":" in name:
        prefix = name.split(":", 1)[0] + ":"
        if prefix in ENCODERS:
            return prefix
    return None


def list_encoders(pattern: str | None = None, include_timm: bool = True) -> list[str]:
    """Registered names, then timm's pretrained ViT-family names, filtered by ``pattern``.

    ``pattern`` is shell-style (``"*dinov2*"``). Prefix entries such as ``hf:`` take a
    model id after the colon and are not listed.
    """
    names = [n for n in ENCODERS.names(pattern) if not n.endswith(":")]
    if include_timm:
        import timm

        timm_names = timm.list_models(list(TIMM_FAMILIES), pretrained=True)
        names += [n for n in timm_names if pattern is None or fnmatch.fnmatch(n, pattern)]
    return names


def _unknown(name: str) -> UnknownEncoderError:
    close = difflib.get_close_matches(name, list_encoders(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownEncoderError(
        f"unknown encoder {name!r}: it is neither a registered hbird encoder nor a timm model."
        f"{hint} Run `hbird encoders` (or hbird.encoders.list_encoders()) to list names; "
        "Hugging Face models are named hf:<model id or local folder>."
    )


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; :class:`InputError` if it is not a device name or
    this machine has no such device (``cuda`` with no visible GPU, ``mps`` off a Mac)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(
            f"{spell('device', device)} is not a torch device name; use e.g. "
            f"{spell('device', 'cpu')} or {spell('device', 'cuda')}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        missing = "no GPU is visible to torch (torch.cuda.is_available() is False)"
    elif dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        missing = f"only {torch.cuda.device_count()} GPU(s) are visible"
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        missing = "Apple's MPS backend is not available here"
    else:
        return dev
    raise InputError(f"{spell('device', device)}: {missing}; {spell('device', 'cpu')} works")


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    device: str | torch.device = "cpu",
    normalize: str = "model",
    **kwargs: Any,
) -> Encoder:
    """Build an encoder by name, frozen: eval mode, ``requires_grad=False``, on ``device``.

    Args:
        name: a registered name, ``hf:<model id or folder>``, or a timm model name.
        weights: local weights file to load (timm, DINO or DINOv2 layout for timm models).
        pretrained: fetch the backend's pretrained weights for ``name``.
        device: where the encoder lives.
        normalize: ``"model"`` (the weights' own mean and std), ``"imagenet"`` or
            ``"M,M,M/S,S,S"`` (see :mod:`hbird.encoders.normalization`).
        **kwargs: backend options (e.g. ``img_size`` for timm, ``seed`` for test encoders).

    Raises:
        UnknownEncoderError: ``name`` is not registered and timm does not know it.
    """
    check_device(device)
    entry = _registered_entry(name)
    if entry is not None:
        encoder = ENCODERS.create(entry, name, weights=weights, pretrained=pretrained, **kwargs)
    else:
        import timm

        if not timm.is_model(name):
            raise _unknown(name)
        from hbird.encoders.timm_backend import create_timm_encoder

        encoder = create_timm_encoder(name, weights=weights, pretrained=pretrained, **kwargs)
    encoder.requires_grad_(False)
    return with_normalize(encoder.eval().to(device), normalize)
