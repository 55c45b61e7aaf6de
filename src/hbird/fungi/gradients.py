"""Per-sample gradients of one linear layer, for many samples in one backward pass.

For ``y = x Wᵀ + b`` applied to the tokens ``u_t`` of an input, the gradient of a loss
``L`` is ``∂L/∂W = Σ_t g_t u_tᵀ`` and ``∂L/∂b = Σ_t g_t`` with ``g_t = ∂L/∂y_t``. When
the batch loss is a sum of per-sample losses that each depend only on their own sample
(true for a ViT or BERT: no normalisation across the batch), ``g_t`` of a token of
sample ``i`` is exactly ``∂L_i/∂y_t``, so a single backward pass of ``Σ_i L_i`` down to
the layer's output gives every per-sample gradient by the sum above (an ``einsum``).
Batches are processed in passes of whole samples of bounded input size (big passes are
slower per sample on CPUs), each pass one forward and one backward.

:class:`LinearTap` implements this with a forward hook: the network up to the layer
runs under ``no_grad`` (nothing is stored for backward), the layer's output becomes an
autograd leaf, and only the rest of the network and the loss are differentiated; the
backward pass stops at that leaf.

Gradient vectors are laid out per output row as ``[W_o, b_o]``, i.e. the flattening of
``cat([∂L/∂W, ∂L/∂b[:, None]], dim=1)`` of shape ``(D_out, D_in + 1)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from hbird.encoders.precision import autocast_context
from hbird.fungi.backbones import FungiBackbone
from hbird.fungi.losses.base import GradientLoss
from hbird.fungi.views import ViewGroup


def gradient_dim(layer: nn.Linear) -> int:
    """Length of one flattened gradient of ``layer``: ``D_out · (D_in + 1)`` with a bias."""
    return layer.out_features * (layer.in_features + (layer.bias is not None))


def flatten_linear_grads(weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
    """``(..., D_out, D_in)`` and ``(..., D_out)`` → ``(..., D_out · (D_in + 1))``, rows ``[W_o, b_o]``."""
    if bias_grad is not None:
        weight_grad = torch.cat([weight_grad, bias_grad.unsqueeze(-1)], dim=-1)
    return weight_grad.flatten(-2)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearTap:
    """Hooks one ``nn.Linear``: records its inputs and makes its outputs autograd leaves.

    Usage::

        with LinearTap(layer) as tap:
            with tap.forward():            # no autograd until the layer runs
                emb = backbone.embed(views)
            loss = per_sample_loss(emb).sum()
            grads = tap.output_grads(loss)  # backward stops at the layer
            per_sample = tap.per_sample(grads, batch_size)

    Forward passes outside :meth:`forward` are not recorded.
    """

    def __init__(self, layer: nn.Linear) -> None:
        self.layer = layer
        self.inputs: list[torch.Tensor] = []
        self.outputs: list[torch.Tensor] = []
        self._armed = False
        self._calls_before = 0
        self._handle: Any = None

    def __enter__(self) -> LinearTap:
        self._handle = self.layer.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        self._armed = False

    def _hook(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> Any:
        if not self._armed:
            return None
        if len(self.outputs) > self._calls_before:
            raise RuntimeError(
                "the gradient layer ran twice in one forward pass; choose a layer that is "
                "applied once per input (e.g. a block's attention output projection)"
            )
        torch.set_grad_enabled(True)  # the rest of this forward is differentiated
        leaf = output.detach().requires_grad_(True)
        self.inputs.append(args[0].detach())
        self.outputs.append(leaf)
        return leaf

    @contextmanager
    def forward(self) -> Iterator[None]:
        """Run one forward pass: ``no_grad`` until the layer, autograd after it."""
        self._calls_before = len(self.outputs)
        self._armed = True
        try:
            with torch.no_grad():
                yield
        finally:
            self._armed = False
        if len(self.outputs) == self._calls_before:
            raise RuntimeError(
                "the gradient layer was not used by the forward pass; check the layer= path "
                "names a module the model actually calls"
            )

    def output_grads(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """``∂loss/∂y`` for every recorded output ``y`` (zeros where ``y`` is unused)."""
        grads = torch.autograd.grad(loss, self.outputs, allow_unused=True)
        return [torch.zeros_like(y) if g is None else g for y, g in zip(self.outputs, grads)]

    def per_sample(self, grads: list[torch.Tensor], batch_size: int) -> torch.Tensor:
        """Per-sample gradients ``(B, D_out · (D_in + 1))``.

        Every recorded forward pass must hold its rows sample-major (``B × V`` views,
        each with any number of tokens); the contributions of all passes are summed.
        """
        d_in, d_out = self.layer.in_features, self.layer.out_features
        acc = _accumulation_dtype(grads[0].dtype)
        weight = torch.zeros(batch_size, d_out, d_in, dtype=acc, device=grads[0].device)
        bias = torch.zeros(batch_size, d_out, dtype=acc, device=grads[0].device)
        for u, g in zip(self.inputs, grads):
            u = u.reshape(batch_size, -1, d_in).to(acc)  # (B, V·T, D_in)
            g = g.reshape(batch_size, -1, d_out).to(acc)  # (B, V·T, D_out)
            weight += torch.einsum("bto,bti->boi", g, u)
            bias += g.sum(dim=1)
        return flatten_linear_grads(weight, bias if self.layer.bias is not None else None)

    def per_token(self, grads: torch.Tensor, call: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of each token's gradient ``g_t ⊗ [u_t, 1]`` for one recorded pass.

        Returns ``g (N, T, D_out)`` and ``u (N, T, D_in + 1)`` (no ones column without a
        bias); the token's flattened gradient is ``(g[..., :, None] * u[..., None, :]).flatten(-2)``.
        """
        u = self.inputs[call]
        acc = _accumulation_dtype(grads.dtype)
        u = u.to(acc)
        if self.layer.bias is not None:
            u = torch.cat([u, torch.ones_like(u[..., :1])], dim=-1)
        return grads.to(acc), u


def batch_size_of(batch: torch.Tensor | list[str]) -> int:
    return batch.shape[0] if isinstance(batch, torch.Tensor) else len(batch)


PASS_ELEMENTS = 128 * 3 * 112 * 112
"""Default input size of one forward/backward pass: 128 SimCLR patches of a 224 image.

Bigger passes are slower per image on CPUs once their activations outgrow the caches."""


def _elements_per_view(group: ViewGroup) -> int:
    """Input values of one view: pixels × channels, or characters of a text view."""
    if isinstance(group.views, torch.Tensor):
        return int(group.views[0].numel())
    return max(1, sum(len(v) for v in group.views) // max(1, len(group.views)))


def _one_pass(
    backbone: FungiBackbone,
    layer: nn.Linear,
    loss: GradientLoss,
    groups: list[ViewGroup],
    size: int,
    autocast: torch.dtype | None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.inference_mode(False), torch.enable_grad(), LinearTap(layer) as tap:
        embeddings = []
        for group in groups:
            with autocast_context(backbone.device, autocast), tap.forward():
                emb = backbone.embed(group.views)  # (B·V, D)
            emb = emb.reshape(size, group.views_per_sample, -1)
            embeddings.append(emb.float() if autocast is not None else emb)
        per_sample_loss = loss(embeddings)  # (B,), heads and loss in full precision
        grads = tap.output_grads(per_sample_loss.sum())
        return tap.per_sample(grads, size), [e.detach() for e in embeddings]


def batched_gradients_and_embeddings(
    backbone: FungiBackbone,
    layer: nn.Linear,
    loss: GradientLoss,
    batch: torch.Tensor | list[str],
    autocast: torch.dtype | None = None,
    max_pass_elements: int | None = PASS_ELEMENTS,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Per-sample gradients of ``loss`` w.r.t. ``layer`` for a prepared batch.

    The views of the batch are made once and processed in passes of whole samples, each
    pass one forward and one backward.

    Args:
        backbone: the frozen model.
        layer: a linear layer of ``backbone.root``.
        loss: a fitted loss; it makes the views and scores them per sample.
        batch: the output of ``backbone.prepare`` for ``B`` inputs.
        autocast: run the model's forward passes under this autocast dtype (the heads and
            the loss are computed in float32).
        max_pass_elements: most input values (pixels × channels, or characters) per pass
            (at least one sample per pass); ``None`` puts the whole batch in one pass.
            Changes the result only by float rounding.

    Returns:
        ``(B, gradient_dim(layer))`` gradients, float32 (float64 for a float64 model), and
        the detached embeddings ``(B, V_g, D)`` of every view group.
    """
    size = batch_size_of(batch)
    groups = loss.make_views(batch)
    per_sample = sum(_elements_per_view(g) * g.views_per_sample for g in groups)
    step = size if max_pass_elements is None else max(1, max_pass_elements // per_sample)
    grads, embeddings = [], []
    for start in range(0, size, step):
        stop = min(size, start + step)
        chunk = [
            ViewGroup(
                g.views[start * g.views_per_sample : stop * g.views_per_sample], g.views_per_sample
            )
            for g in groups
        ]
        grad, embs = _one_pass(backbone, layer, loss, chunk, stop - start, autocast)
        grads.append(grad)
        embeddings.append(embs)
    return torch.cat(grads), [torch.cat(parts) for parts in zip(*embeddings)]


def batched_gradients(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``(B, gradient_dim(layer))`` per-sample gradients only; same arguments as
    :func:`batched_gradients_and_embeddings`."""
    return batched_gradients_and_embeddings(*args, **kwargs)[0]


def naive_gradients(
    backbone: FungiBackbone,
    layer: nn.Linear,
    loss: GradientLoss,
    batch: torch.Tensor | list[str],
) -> torch.Tensor:
    """The oracle: one forward and one plain autograd backward per sample.

    Same views, same loss, but the gradient is ``torch.autograd.grad`` of each sample's
    loss w.r.t. the layer's parameters. Slow; for tests and benchmarks.

    Returns:
        ``(B, gradient_dim(layer))`` in the model's dtype.
    """
    params = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    was_trainable = [p.requires_grad for p in params]
    rows = []
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            for i in range(batch_size_of(batch)):
                sample = backbone.batch_slice(batch, i, i + 1)
                embeddings = [
                    backbone.embed(g.views).reshape(1, g.views_per_sample, -1)
                    for g in loss.make_views(sample)
                ]
                grads = torch.autograd.grad(loss(embeddings)[0], params)
                rows.append(flatten_linear_grads(grads[0], grads[1] if len(grads) > 1 else None))
    finally:
        for p, flag in zip(params, was_trainable):
            p.requires_grad_(flag)
    return torch.stack(rows)
