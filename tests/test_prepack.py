"""Prepacked bf16 linears are an exact fast path of CPU bf16 autocast.

The oracle is ``torch.autocast("cpu", dtype=torch.bfloat16)`` on the unchanged model:
the prepacked path must give the same bits, and must leave every call it does not cover
(float32, gradients on) to the layer as it is.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hbird.encoders import create_encoder, encode_batches
from hbird.encoders.prepack import prepack_supported, prepacked_linears

needs_onednn_bf16 = pytest.mark.skipif(
    not prepack_supported(), reason="this CPU / torch build has no oneDNN bf16 kernels"
)


def autocast_bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def vit():
    return create_encoder("test_vit_reg")


@needs_onednn_bf16
@pytest.mark.parametrize(("d_in", "d_out"), [(384, 1152), (1536, 384), (32, 96)])
@pytest.mark.parametrize("rows", [1, 17, 785, 3140])
def test_linear_is_bit_identical_to_autocast(d_in, d_out, rows) -> None:
    """ViT-S/16's layer shapes (and the test ViT's) at batch 1-4 of 785 tokens."""
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out)
    x = torch.randn(rows, d_in)
    with torch.inference_mode(), autocast_bf16():
        expected = layer(x)
        with prepacked_linears(layer):
            got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@needs_onednn_bf16
@pytest.mark.parametrize(("d_in", "d_out"), [(384, 1152), (1536, 384), (32, 96)])
@pytest.mark.parametrize("rows", [1, 785, 3140])
def test_bf16_linear_is_bit_identical_to_the_plain_bf16_layer(d_in, d_out, rows) -> None:
    """A bf16 layer on a bf16 input, no autocast (hbird.encoders.bf16_model's copy)."""
    torch.manual_seed(0)
    layer = nn.Linear(d_in, d_out).bfloat16()
    x = torch.randn(rows, d_in).bfloat16()
    with torch.inference_mode():
        expected = layer(x)
        with prepacked_linears(layer):
            got = layer(x)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)


@needs_onednn_bf16
@pytest.mark.parametrize("layers", [None, [0, -1]])
def test_encode_batches_is_bit_identical_to_plain_autocast(vit, layers) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, *s) for s in [(40, 56)] * 3 + [(32, 32), (16, 72)]]
    for batch_size in (1, 2, 16):
        fast = encode_batches(vit, images, layers, batch_size=batch_size, autocast="bf16")
        plain = encode_batches(
            vit, images, layers, batch_size=batch_size, autocast="bf16", prepack=False
        )
        assert all(torch.equal(f, p) for f, p in zip(fast, plain))


def test_other_calls_run_the_layer_as_it_is() -> None:
    """Float32, and bf16 with gradients on, are the unchanged layer's (and get gradients)."""
    torch.manual_seed(0)
    layer = nn.Linear(8, 4)
    x = torch.randn(5, 3, 8)
    with torch.no_grad():
        expected = layer(x)
    with prepacked_linears(layer):
        with torch.no_grad():
            assert torch.equal(layer(x), expected)
        with autocast_bf16():
            layer(x).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert "forward" not in vars(layer)  # restored on exit


@needs_onednn_bf16
def test_packed_weights_follow_in_place_changes() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with torch.inference_mode(), autocast_bf16():
        with prepacked_linears(layer):
            before = layer(x)
        with torch.no_grad():
            layer.weight.mul_(2.0)
            layer.bias.add_(1.0)
        expected = layer(x)
        with prepacked_linears(layer):
            after = layer(x)
    assert torch.equal(after, expected) and not torch.equal(after, before)
    assert torch.equal(layer.state_dict()["weight"], state["weight"] * 2.0)
