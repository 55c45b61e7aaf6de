"""Linear layers on prepacked bf16 weights under CPU bf16 autocast: an exact fast path.

Under ``torch.autocast("cpu", dtype=torch.bfloat16)`` every ``nn.Linear`` call casts its
float32 weight and bias to bf16 and hands them to oneDNN, which reorders the weight into
its blocked (AMX / AVX512-BF16) layout, on every call. :func:`prepacked_linears` does the
cast and the reorder once per layer and calls oneDNN's linear on the packed weight; the
input is cast to bf16 as autocast casts it. On CPUs where oneDNN has bf16 kernels the
features are bit-identical to autocast's (``tests/test_prepack.py`` checks it with
autocast as the oracle) and ViT linears run about 2× faster (docs/performance.md, "The
encoder on the CPU").

The packed copies are cached per layer (weak references, so they go with the model) and
rebuilt when a weight or bias is changed in place or replaced.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

_PACKED: weakref.WeakKeyDictionary[nn.Linear, tuple[Any, torch.Tensor, torch.Tensor | None]]
_PACKED = weakref.WeakKeyDictionary()


def prepack_supported() -> bool:
    """Whether this torch build has oneDNN with bf16 kernels for this CPU."""
    return torch.backends.mkldnn.is_available() and bool(
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _version(t: torch.Tensor | None) -> tuple[int, int] | None:
    return None if t is None else (t.data_ptr(), t._version)


def _packed(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s weight cast to bf16 and reordered by oneDNN, and its bf16 bias."""
    key = (_version(layer.weight), _version(layer.bias))
    cached = _PACKED.get(layer)
    if cached is not None and cached[0] == key:
        return cached[1], cached[2]
    with torch.no_grad():
        weight = torch.ops.mkldnn._reorder_linear_weight(layer.weight.to(torch.bfloat16))
        bias = None if layer.bias is None else layer.bias.to(torch.bfloat16)
    _PACKED[layer] = (key, weight, bias)
    return weight, bias


def _takes_fast_path(layer: nn.Linear, x: torch.Tensor) -> bool:
    """The call autocast would run in bf16 on the CPU, or a bf16 layer's call on a bf16
    input (:mod:`hbird.encoders.bf16_model`), with no gradient wanted."""
    if torch.is_grad_enabled() or x.device.type != "cpu" or layer.weight.device.type != "cpu":
        return False
    if layer.weight.dtype == torch.bfloat16:
        return x.dtype == torch.bfloat16
    return (
        torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
        and x.dtype in (torch.float32, torch.bfloat16)
        and layer.weight.dtype == torch.float32
    )


def _fast_forward(layer: nn.Linear) -> Any:
    original = layer.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if not _takes_fast_path(layer, x):
            return original(x)
        weight, bias = _packed(layer)
        shape = x.shape  # (..., in_features)
        rows = x.to(torch.bfloat16).reshape(-1, shape[-1])
        out = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")
        return out.reshape(*shape[:-1], layer.out_features)  # (..., out_features)

    return forward


@contextmanager
def prepacked_linears(model: nn.Module) -> Iterator[None]:
    """Run ``model``'s ``nn.Linear`` layers on prepacked bf16 weights inside the block.

    Only calls made under CPU bf16 autocast, or of a bf16 layer on a bf16 input, with
    gradients off take the fast path; any other call (float32, a GPU, training) runs the
    layer as it is. Without oneDNN bf16
    support this is a no-op. The model itself (its parameters, ``state_dict``, identity)
    is unchanged.
    """
    if not prepack_supported():
        yield
        return
    layers = [m for m in model.modules() if type(m) is nn.Linear and "forward" not in vars(m)]
    for layer in layers:
        layer.forward = _fast_forward(layer)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward
