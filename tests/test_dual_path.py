"""The dual-path transformer block (thesis §4.3.3, eq. 4.13-4.14) against naive loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hbird.nn.dual_path import DualPathBlock, memory_to_all, pixel_to_memory


def _softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def naive_pixel_to_memory(q_p, k_m, v_m):
    """Eq. 4.13 per batch b, pixel a, head g: y_a = Σ_n softmax_n(q_a · k_n) v_n."""
    b_, p_, g_, _ = q_p.shape
    n_, e_ = k_m.shape[1], v_m.shape[-1]
    out = torch.zeros(b_, p_, g_, e_, dtype=torch.float64)
    for b in range(b_):
        for a in range(p_):
            for g in range(g_):
                weights = _softmax(
                    [float(q_p[b, a, g].detach() @ k_m[b, n, g].detach()) for n in range(n_)]
                )
                for n in range(n_):
                    out[b, a, g] += weights[n] * v_m[b, n, g].detach().double()
    return out


def naive_memory_to_all(q_m, k_p, v_p, k_m, v_m):
    """Eq. 4.14: one softmax over the HW pixel keys followed by the N memory keys."""
    b_, n_, g_, _ = q_m.shape
    out = torch.zeros(b_, n_, g_, v_m.shape[-1], dtype=torch.float64)
    for b in range(b_):
        keys = [k_p[b, i] for i in range(k_p.shape[1])] + [k_m[b, i] for i in range(n_)]
        values = [v_p[b, i] for i in range(v_p.shape[1])] + [v_m[b, i] for i in range(n_)]
        for j in range(n_):
            for g in range(g_):
                weights = _softmax([float(q_m[b, j, g].detach() @ k[g].detach()) for k in keys])
                for w, v in zip(weights, values):
                    out[b, j, g] += w * v[g].detach().double()
    return out


def test_pixel_to_memory_is_eq_4_13() -> None:
    torch.manual_seed(0)
    q_p, k_m, v_m = torch.randn(2, 5, 3, 4), torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 2)
    got = pixel_to_memory(q_p, k_m, v_m)
    assert got.shape == (2, 5, 3, 2)
    torch.testing.assert_close(
        got.double(), naive_pixel_to_memory(q_p, k_m, v_m), atol=1e-5, rtol=1e-5
    )


def test_memory_to_all_is_one_softmax_over_pixels_and_memory() -> None:
    torch.manual_seed(1)
    q_m, k_m, v_m = torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 5)
    k_p, v_p = torch.randn(2, 7, 2, 4), torch.randn(2, 7, 2, 5)
    got = memory_to_all(q_m, k_p, v_p, k_m, v_m)
    torch.testing.assert_close(
        got.double(), naive_memory_to_all(q_m, k_p, v_p, k_m, v_m), atol=1e-5, rtol=1e-5
    )
    # not two separate softmaxes: the pixel and memory weights share one normaliser
    two = pixel_to_memory(q_m, k_p, v_p) + pixel_to_memory(q_m, k_m, v_m)
    assert not torch.allclose(got, two, atol=1e-3)


def _randomise_norms(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()


def test_block_wiring_against_the_equations() -> None:
    """Eval mode, P2P = identity: pixels' = relu(x + BN(W_o y^p)) with y^p by eq. 4.13
    on (q^p from the pixels, k^m, v^m from the memory); memory' = x^m + BN(W_o y^m) with
    y^m by eq. 4.14, then + FFN. Projections recomputed by hand from the weights."""
    torch.manual_seed(2)
    block = DualPathBlock(8, 6, width=8, heads=2, pixel_block=nn.Identity(), ffn_dim=5)
    _randomise_norms(block)
    block.eval()
    pixels, memory = torch.randn(1, 2, 3, 8), torch.randn(1, 4, 6)

    def bn(norm, x):
        return (x - norm.running_mean) / torch.sqrt(norm.running_var + norm.eps) * norm.weight + (
            norm.bias
        )

    def heads(x):
        return [t.reshape(1, x.shape[1], 2, 4) for t in x.split(8, dim=-1)]

    qp, kp, vp = heads(bn(block.pixel_bn_qkv, pixels.reshape(1, 6, 8) @ block.pixel_qkv.weight.T))
    qm, km, vm = heads(bn(block.memory_bn_qkv, memory @ block.memory_qkv.weight.T))
    y_p = naive_pixel_to_memory(qp, km, vm).float().reshape(1, 2, 3, 8)
    y_m = naive_memory_to_all(qm, kp, vp, km, vm).float().reshape(1, 4, 8)
    want_p = torch.relu(pixels + bn(block.pixel_bn_out, y_p @ block.pixel_out.weight.T))
    mem = memory + bn(block.memory_bn_out, y_m @ block.memory_out.weight.T)
    lin1, _, lin2, norm = block.ffn
    hidden = torch.relu(mem @ lin1.weight.T + lin1.bias)
    want_m = mem + bn(norm, hidden @ lin2.weight.T)
    with torch.no_grad():
        got_p, got_m = block(pixels, memory)
    torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got_m, want_m, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("pixel_block", ["axial", "conv"])
def test_memory_slots_are_exchangeable(pixel_block: str) -> None:
    """No position on the memory: permuting its slots permutes the memory output and
    leaves the pixel output unchanged (P2M sums over all slots)."""
    torch.manual_seed(3)
    block = DualPathBlock(16, 8, width=16, heads=8, pixel_block=pixel_block, span=5).eval()
    pixels, memory = torch.randn(2, 4, 5, 16), torch.randn(2, 6, 8)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    with torch.no_grad():
        p1, m1 = block(pixels, memory)
        p2, m2 = block(pixels, memory[:, perm])
    assert p1.shape == pixels.shape and m1.shape == memory.shape
    torch.testing.assert_close(p2, p1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m2, m1[:, perm], atol=1e-5, rtol=1e-5)


def test_block_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="pixel_block"):
        DualPathBlock(8, 8, 8, heads=2, pixel_block="dense")
    with pytest.raises(ValueError, match="multiple of heads"):
        DualPathBlock(8, 8, 12, heads=8)
