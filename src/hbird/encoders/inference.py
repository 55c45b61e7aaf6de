"""Batched feature extraction over lists of images of possibly different sizes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import nullcontext

import torch
from tqdm.auto import tqdm

from hbird.encoders import bf16_model as whole_bf16
from hbird.encoders import compiled
from hbird.encoders.base import Encoder, Layers
from hbird.encoders.precision import autocast_context, parse_autocast
from hbird.encoders.prepack import prepacked_linears


def _check_image(i: int, image: torch.Tensor) -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"image {i} must be a (3, H, W) tensor, got {shape}")
    if not image.is_floating_point():
        raise ValueError(
            f"image {i} has dtype {image.dtype}; pass float images in [0, 1] "
            "(e.g. from hbird.io.images or image.float() / 255)"
        )


def runs_of_equal_size(images: Sequence[torch.Tensor], batch_size: int) -> Iterator[list[int]]:
    """Indices of consecutive images with equal ``(H, W)``, at most ``batch_size`` per run."""
    run: list[int] = []
    for i, image in enumerate(images):
        if run and (len(run) == batch_size or image.shape != images[run[0]].shape):
            yield run
            run = []
        run.append(i)
    if run:
        yield run


def _compiled_forward(
    encoder: Encoder, x: torch.Tensor, layers: Layers, batch_size: int
) -> torch.Tensor:
    """``(B, 3, H, W)`` → ``(B, h, w, D)`` through the compiled forward, ``x`` padded with
    copies of its last image to a batch size already compiled (their features dropped)."""
    b, _, height, width = x.shape
    size = compiled.padded_size(encoder, b, height, width, most=batch_size)
    if size > b:
        x = torch.cat([x, x[-1:].expand(size - b, -1, -1, -1)])
    return compiled.compiled_forward(encoder, x, layers)[:b]


def encode_batches(
    encoder: Encoder,
    images: Sequence[torch.Tensor],
    layers: Layers = None,
    batch_size: int = 16,
    progress: bool | str = False,
    autocast: str | torch.dtype | None = None,
    prepack: bool = True,
    compile: bool = False,
    bf16_model: bool = False,
) -> list[torch.Tensor]:
    """Patch features of every image, computed in batches.

    Args:
        encoder: a frozen encoder (its device and dtype are used).
        images: ``(3, H, W)`` float tensors in [0, 1], sides multiples of the patch size
            (see ``hbird.data.transforms.resize_for_encoder``); consecutive images of
            equal size are batched together.
        layers: blocks to take (see ``Encoder.forward_patches``).
        batch_size: most images per forward pass.
        progress: show a tqdm bar; a string is used as its description.
        autocast: ``"bf16"`` or ``"fp16"`` to run the forward passes under autocast
            (features still come back float32); ``None`` for full precision.
        prepack: under bf16 autocast on the CPU, run the linear layers on weights cast
            and packed for oneDNN once (:mod:`hbird.encoders.prepack`): bit-identical
            features, faster; ``False`` lets autocast cast every weight on every call.
        compile: run the forward passes through ``torch.compile`` with weight freezing
            (:mod:`hbird.encoders.compiled`): faster on long runs of equal-size images,
            each new batch shape compiles first (tens of seconds); features change
            slightly. A short last batch is padded to a batch size already compiled.
        bf16_model: with ``autocast="bf16"``, run a bf16 copy of the whole encoder
            instead of autocast (:mod:`hbird.encoders.bf16_model`): residual stream and
            LayerNorms in bf16, no casts, attention over a multiple of 16 keys; faster
            on the CPU, features about twice as far from float32 as autocast's.

    Returns:
        One ``(h, w, D)`` float32 CPU tensor per image, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    for i, image in enumerate(images):
        _check_image(i, image)
    autocast_dtype = parse_autocast(autocast)
    if bf16_model:
        if autocast_dtype != torch.bfloat16 or compile:
            raise ValueError(
                "bf16_model=True runs the whole encoder in bf16: it needs autocast='bf16' "
                f"and compile=False (got autocast={autocast!r}, compile={compile})"
            )
        encoder, autocast_dtype = whole_bf16.bf16_copy(encoder), None
    param = next(encoder.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    features: list[torch.Tensor] = []
    description = progress if isinstance(progress, str) else None
    # compiled graphs prepack their own weights (inductor's freezing)
    bf16 = autocast_dtype == torch.bfloat16 or bf16_model
    fast = prepack and not compile and bf16 and device.type == "cpu"
    with (
        tqdm(total=len(images), desc=description, disable=not progress, unit="img") as bar,
        prepacked_linears(encoder) if fast else nullcontext(),
        whole_bf16.split_attention() if bf16_model else nullcontext(),
    ):
        for run in runs_of_equal_size(images, batch_size):
            batch = torch.stack([images[i] for i in run]).to(device=device, dtype=torch.float32)
            with torch.inference_mode(), autocast_context(device, autocast_dtype):
                x = encoder.normalize(batch).to(dtype)
                if compile:
                    feats = _compiled_forward(encoder, x, layers, batch_size)
                else:
                    feats = encoder.forward_patches(x, layers)
                feats = feats.to("cpu", torch.float32)  # (B, h, w, D)
            # clone outside inference mode so callers get ordinary, independent tensors
            features.extend(f.clone() for f in feats.unbind(0))
            bar.update(len(run))
    return features
