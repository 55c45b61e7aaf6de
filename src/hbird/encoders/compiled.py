"""``torch.compile`` of an encoder's forward pass with inductor's weight freezing (opt-in).

With ``freezing``, inductor treats the frozen weights as constants: it prepacks them for
oneDNN and fuses the layer norms, GELUs, residual adds and casts around the matmuls. On
this 2-core CPU under bf16 autocast timm's ViT-S/16 encoded 0.7-1.5× as fast as eager
depending on threads and load (1.3-1.5× on one thread under load; not faster on two
threads on a quieter machine), after a compile of 20-55 s per batch shape (inductor
caches it on disk, so a second process pays less). Fused kernels round differently, so features change slightly
(float32: 3e-6; bf16: as far from eager bf16 as bf16 is from float32): it is an option
(``patch`` features' ``compile=true``, the ``hummingbird_bf16_compile`` preset), never
the default. See docs/performance.md, "The encoder on the CPU".

One compiled function is kept per encoder (on it) and rebuilt when a weight changes.
Each new input shape compiles again, so :func:`padded_size` lets a short last batch
reuse the shape of a longer one already compiled.
"""

from __future__ import annotations

import itertools
import types

import torch

from hbird.encoders.base import Encoder, Layers


def _forward(encoder: Encoder, x: torch.Tensor, layers: Layers) -> torch.Tensor:
    return encoder.forward_patches(x, layers)


class _Compiled:
    def __init__(self, encoder: Encoder) -> None:
        self.key = weights_key(encoder)
        # Dynamo keeps compiled graphs on the code object, and a graph frozen on one
        # encoder's weights must never run another's (or the same one's changed weights):
        # each entry compiles its own copy of ``_forward``, bound to its encoder (so that
        # the weights are the module's constants, which freezing folds and prepacks).
        code = _forward.__code__.replace(co_name=f"_forward_{next(_serial)}")
        own = types.FunctionType(code, _forward.__globals__, code.co_name)
        bound = types.MethodType(own, encoder)
        self.forward = torch.compile(bound, dynamic=False)
        self.shapes: set[tuple[int, ...]] = set()  # (B, H, W) compiled so far


_serial = itertools.count()


def weights_key(encoder: Encoder) -> tuple:
    """Where each weight lives and how often it was changed in place: a copy kept for
    ``encoder`` is stale once this differs."""
    return tuple((t.data_ptr(), t._version) for t in encoder.state_dict().values())


def _entry(encoder: Encoder) -> _Compiled:
    entry = vars(encoder).get("_compiled")  # kept on the encoder: it goes with it
    if entry is None or entry.key != weights_key(encoder):  # a copy's weights differ too
        entry = vars(encoder)["_compiled"] = _Compiled(encoder)
    return entry


def padded_size(encoder: Encoder, batch: int, height: int, width: int, most: int) -> int:
    """How many images to run for a batch of ``batch`` at ``height × width``: the smallest
    size at most ``most`` already compiled at that size, else ``batch`` itself."""
    sizes = [b for b, h, w in _entry(encoder).shapes if h == height and w == width]
    return min((b for b in sizes if batch <= b <= most), default=batch)


def compiled_forward(encoder: Encoder, x: torch.Tensor, layers: Layers = None) -> torch.Tensor:
    """``encoder.forward_patches(x, layers)`` through the compiled graph: normalised
    ``(B, 3, H, W)`` → ``(B, h, w, D · len(layers))``. Call it without gradients."""
    entry = _entry(encoder)
    entry.shapes.add((x.shape[0], x.shape[2], x.shape[3]))
    import torch._inductor.config as inductor_config  # heavy: only when compiling

    # torch.compile(options={"freezing": True}) is not honoured (torch 2.14): the setting
    # must hold when inductor runs, i.e. on the call that compiles
    with inductor_config.patch(freezing=True):
        return entry.forward(x, layers)
