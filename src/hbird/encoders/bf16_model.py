"""The whole encoder in bf16 (opt-in): weights, residual stream and LayerNorms, no casts.

Under CPU bf16 autocast (``autocast="bf16"``) the model stays float32: the residual
stream and the LayerNorm outputs are float32 and every linear layer casts its input to
bf16 and back, about a tenth of a ViT's forward in copies and float32 adds. Here a bf16
copy of the encoder runs instead, with no autocast: torch's bf16 LayerNorm and GELU
still compute in float32 inside and round their outputs, the residual adds round to
bf16, and the features are handed back float32. Two more pieces make it fast on a CPU:

* the linear layers run on prepacked oneDNN weights (:mod:`hbird.encoders.prepack`,
  which takes bf16 weights and inputs too);
* :func:`split_prefix_keys`: torch's CPU flash attention is much slower for some key
  counts that are not a multiple of 16 (ViT-S/16 at 448 px: 784 patches + the class
  token). The ``n mod 16`` first keys (the prefix tokens) are split off, flash attention
  runs over each part, and their log-sum-exps merge them exactly:
  ``out = out₁ + σ(lse₂ − lse₁)·(out₂ − out₁)``. Only key counts measured to gain are
  split (:func:`_kernel_slow_tail`).

It changes features about twice as much as autocast does (docs/performance.md, "The
encoder on the CPU"), so it is a named option (``patch`` features'
``bf16_model=true`` with ``autocast=bf16``), never the default. It wins where the
split attention does (ViT-S/16 at 448 px: 1.2-1.35x autocast), not at 512 px.

The bf16 copy is kept on the encoder and rebuilt when a weight changes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from hbird.encoders.base import Encoder
from hbird.encoders.compiled import weights_key

_FLASH_BLOCK = 16
"""Key counts that are multiples of this run fast in torch's CPU flash attention."""
_KV_BLOCK = 512
"""The keys per block of torch's CPU flash attention (its ``kv_split_size``)."""


def bf16_copy(encoder: Encoder) -> Encoder:
    """A bf16 copy of ``encoder`` (cached on it; rebuilt when one of its weights changes)."""
    cached = vars(encoder).get("_bf16_copy")  # kept on the encoder: it goes with it
    key = weights_key(encoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    # copies kept on the encoder (this one's, a compiled forward's) stay out of the copy
    memo = {id(v): None for k, v in vars(encoder).items() if k in ("_bf16_copy", "_compiled")}
    with torch.no_grad():
        model = copy.deepcopy(encoder, memo).to(torch.bfloat16)
    vars(encoder)["_bf16_copy"] = (key, model)
    return model


def split_prefix_keys(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention ``(B, H, Nq, d)`` of ``q`` over keys/values ``(B, H, Nk, d)``,
    the first ``Nk mod 16`` keys computed apart and merged by log-sum-exp (see above).

    Equal to ``F.scaled_dot_product_attention(q, k, v)`` up to bf16 rounding."""
    r = k.shape[-2] % _FLASH_BLOCK
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    out, lse = flash(q, k[:, :, r:], v[:, :, r:])  # (B, H, Nq, d) bf16, (B, H, Nq) float32
    prefix, prefix_lse = flash(q, k[:, :, :r], v[:, :, :r])
    # the prefix keys' share of the softmax: e^lse_p / (e^lse + e^lse_p)
    share = torch.sigmoid(prefix_lse - lse).unsqueeze(-1).to(q.dtype)
    return out.lerp_(prefix, share)


def _kernel_slow_tail(keys: int) -> bool:
    """Whether torch's CPU flash kernel (torch 2.14) runs ``keys`` keys slowly: it takes
    keys in blocks of 512, and a last block of an odd size of at least 256 keys costs
    far more than the merge (measured: 785 and 1297 keys 1.15-1.4x; 197, 577 and 1025
    keys, whose last blocks are short or even, lose 5-40% when split)."""
    tail = (keys - 1) % _KV_BLOCK + 1
    return tail % 2 == 1 and tail >= _KV_BLOCK // 2


def _splits(args: tuple, kwargs: dict) -> bool:
    """A plain CPU bf16 SDPA call (no mask, dropout, causality or own scale) whose keys
    are not a multiple of 16 and end in a slow last block."""
    if len(args) != 3 or any(value for value in kwargs.values()):
        return False
    q, k, v = args
    return (
        all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and t.ndim == 4 for t in args)
        and k.shape == v.shape
        and k.shape[-2] % _FLASH_BLOCK != 0
        and _kernel_slow_tail(k.shape[-2])
        and not torch.is_grad_enabled()
    )


class _SplitPrefixKeys(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _splits(args, kwargs):
            return split_prefix_keys(*args)
        return func(*args, **kwargs)


@contextmanager
def split_attention() -> Iterator[None]:
    """Inside the block, plain CPU bf16 ``F.scaled_dot_product_attention`` calls whose
    key count is not a multiple of 16 run through :func:`split_prefix_keys`."""
    with _SplitPrefixKeys():
        yield
