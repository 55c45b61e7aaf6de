"""Reading weight files and mapping official checkpoint layouts onto timm models.

Supported files: ``.safetensors`` and PyTorch pickles (``.pth``, ``.pt``, ``.bin``,
``.ckpt``, read with ``weights_only=True``). Supported layouts, besides timm's own:

* the original DINO repository (facebookresearch/dino): timm-style keys, possibly inside
  a full training checkpoint (``{"teacher": {"backbone.…", "head.…"}, "student": …}``);
* the official DINOv2 repository (facebookresearch/dinov2): ``mask_token``,
  ``register_tokens``, chunked ``blocks.<chunk>.<i>.…`` and SwiGLU ``w12``/``w3`` keys,
  a position embedding at the 518-pixel grid;
* anything else timm's own ``checkpoint_filter_fn`` understands (OpenAI CLIP, OpenCLIP,
  DINOv2, AIMv2, ...).

Position embeddings saved for another grid are resampled to the model's grid.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hbird.errors import InputError
from hbird.io.checkpoints import architecture_options, is_hbird_checkpoint, read_metadata

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")  # .pth.tar: torch.save by convention
SAFETENSORS_SUFFIXES = (".safetensors",)

# Training checkpoints hold the weights under one of these keys; earlier keys win
# (the DINO teacher is the network the paper evaluates, not the student).
CONTAINER_KEYS = ("teacher", "model_ema", "state_dict", "model", "module", "student")

# Key prefixes added by wrappers: DistributedDataParallel, torch.compile, the
# backbone/head split of self-supervised trainers (keys without it are heads).
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "backbone.")

# Keys a backbone may legitimately lack or not use: classifier heads are absent when
# the timm model is built with ``num_classes=0``; DINOv2's mask token is only for training.
IGNORABLE_KEY = re.compile(r"^(head|head_dist|fc_norm|pre_logits|mask_token)(\.|$)")

_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")

TIMM_HINT = (
    "Check that the encoder name matches the checkpoint's architecture "
    "(e.g. vit_small_patch14_dinov2 for dinov2_vits14, vit_small_patch14_reg4_dinov2 "
    "for dinov2_vits14_reg, vit_small_patch16_224 for dino_deitsmall16)"
)


def read_weights_file(path: str | Path) -> dict[str, Any]:
    """Load a weights file into a dict (nested containers kept); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"weights file {path} does not exist; check the path")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:
            raise InputError(
                f"weights file {path} could not be read as safetensors ({err}); "
                "the file is probably truncated or not a safetensors file"
            ) from err
    if suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(
                f"weights file {path} could not be read with torch.load(weights_only=True) "
                f"({type(err).__name__}: {err}); it must be a state dict of tensors saved with "
                "torch.save (pickled Python objects are refused for safety)"
            ) from err
        if not isinstance(obj, Mapping):
            raise InputError(
                f"weights file {path} holds a {type(obj).__name__}, not a dict of tensors; "
                "save model.state_dict() rather than the model object"
            )
        return dict(obj)
    known = ", ".join(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES)
    raise InputError(
        f"weights file {path} has an unsupported extension {suffix!r}; use one of {known}"
    )


def unwrap_state_dict(
    obj: Mapping[str, Any], source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Descend into training-checkpoint containers and strip wrapper prefixes.

    ``{"teacher": {"backbone.blocks.0…": t, "head.mlp…": t}}`` → ``{"blocks.0…": t}``.
    """
    current: Mapping[str, Any] = obj
    while not any(isinstance(v, torch.Tensor) for v in current.values()):
        inner = next(
            (current[k] for k in CONTAINER_KEYS if isinstance(current.get(k), Mapping)), None
        )
        if inner is None:
            keys = ", ".join(list(current)[:10]) or "(empty)"
            raise InputError(
                f"{source} holds no tensors where weights were expected (keys: {keys}); "
                f"weights are looked for at the top level or under {', '.join(CONTAINER_KEYS)}"
            )
        current = inner
    tensors = {k: v for k, v in current.items() if isinstance(v, torch.Tensor)}
    for prefix in WRAPPER_PREFIXES:
        if any(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    return tensors


def merge_block_chunks(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DINOv2's chunked ``blocks.<chunk>.<i>.…`` keys → ``blocks.<i>.…`` (``i`` is global)."""
    return {_CHUNKED_BLOCK.sub(r"blocks.\1.", k): v for k, v in state_dict.items()}


def align_layer_scale_names(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Rename ``ls1.gamma`` ↔ ``ls1.weight`` to whichever the model uses (timm versions differ)."""
    out = {}
    for key, value in state_dict.items():
        if key not in expected:
            for old, new in ((".gamma", ".weight"), (".weight", ".gamma")):
                if re.search(r"\.ls\d" + re.escape(old) + "$", key):
                    renamed = key[: -len(old)] + new
                    if renamed in expected:
                        key = renamed
                        break
        out[key] = value
    return out


def timm_filter_fn(model: nn.Module):
    """timm's ``checkpoint_filter_fn`` for the module defining ``model``'s class, if any."""
    module = sys.modules.get(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def to_timm_layout(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module
) -> dict[str, torch.Tensor]:
    """A flat state dict in DINO / DINOv2 / timm / CLIP layout → ``model``'s own keys.

    timm's filter converts DINOv2 (mask/register tokens, SwiGLU names) and CLIP layouts,
    and resamples a position embedding saved for another grid (e.g. DINOv2's 37×37 at
    518 px) to ``model.patch_embed.grid_size``.
    """
    converted = merge_block_chunks(state_dict)
    filter_fn = timm_filter_fn(model)
    if filter_fn is not None:
        converted = filter_fn(dict(converted), model)
    return align_layer_scale_names(converted, model.state_dict())


def _check_patch_kernel(
    state_dict: Mapping[str, torch.Tensor], model: nn.Module, context: str
) -> None:
    """Refuse a patch-embedding kernel of another size (timm would silently resample it)."""
    saved = state_dict.get("patch_embed.proj.weight")
    wanted = model.state_dict().get("patch_embed.proj.weight")
    if saved is not None and wanted is not None and saved.ndim == 4 and saved.shape != wanted.shape:
        raise InputError(
            f"{context}: shape mismatches (file vs model): patch_embed.proj.weight "
            f"{tuple(saved.shape)} vs {tuple(wanted.shape)} (patch size "
            f"{saved.shape[-1]} vs {wanted.shape[-1]}). Pick the encoder name with the "
            "checkpoint's patch size and width"
        )


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def load_weights(
    model: nn.Module,
    path: str | Path,
    arch: str = "the model",
    convert: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    hint: str = TIMM_HINT,
) -> None:
    """Load a weights file into ``model`` with strict key and shape checking.

    ``convert`` maps the unwrapped state dict onto ``model``'s keys (default: the timm
    layouts above); ``hint`` ends the error message (which encoder name to pick).

    Raises:
        InputError: the file is missing or unreadable, or its tensors do not fit ``model``
            (missing, unexpected or mis-shaped keys are listed). Classifier-head keys and
            DINOv2's ``mask_token`` are ignored.
    """
    state_dict = unwrap_state_dict(read_weights_file(path), source=f"weights file {path}")
    if convert is None:
        _check_patch_kernel(state_dict, model, f"weights file {path} does not fit {arch}")
        state_dict = to_timm_layout(state_dict, model)
    else:
        state_dict = convert(state_dict)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not IGNORABLE_KEY.match(k)]
    unexpected = [k for k in state_dict if k not in expected and not IGNORABLE_KEY.match(k)]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_describe(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_describe(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches (file vs model): {_describe(mismatched)}")
        raise InputError(
            f"weights file {path} does not fit {arch}: " + "; ".join(problems) + ". " + hint
        )
    usable = {k: v for k, v in state_dict.items() if k in expected}
    model.load_state_dict(usable, strict=False)


def hbird_checkpoint_options(path: str | Path) -> dict[str, Any]:
    """Model options recorded in an ``hbird pretrain`` checkpoint (empty for other files).

    ``hbird pretrain`` writes the timm ``create_model`` options its architecture needs
    (``model_kwargs``) and its normalisation (``mean``, ``std``) into the safetensors
    metadata (:mod:`hbird.io.checkpoints`), so ``--encoder <arch> --weights checkpoint.safetensors`` rebuilds the same
    network. Returns ``{"model_kwargs": {...}, "mean": [...], "std": [...]}`` or ``{}``.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return {}
    meta = read_metadata(path)
    return architecture_options(meta) if is_hbird_checkpoint(meta, path) else {}
