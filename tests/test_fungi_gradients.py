"""Batched per-sample gradients against plain per-sample autograd (float64 oracle)."""

import pytest
import torch

from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.fungi import ImageBackbone, LinearTap, batched_gradients, create_loss, naive_gradients
from hbird.fungi.losses.base import LOSSES

SMALL_OPTIONS = {  # tiny settings of every registered loss (the contract walks LOSSES)
    "kl": {},
    "dino": {"num_local": 3, "local_size": 16},
    "simclr": {"num_negative_inputs": 3},
}


def test_every_loss_has_small_options():
    assert sorted(SMALL_OPTIONS) == LOSSES.names()


@pytest.fixture(scope="module")
def setup():
    encoder = create_encoder("test_vit").double()
    backbone = ImageBackbone(encoder, image_size=32)
    images = [s.image for s in make_scenes(6, seed=3, size=(40, 48))]
    _, layer = backbone.resolve_layer(None)
    return backbone, layer, images


def build_loss(name, backbone, images):
    loss = create_loss(name, backbone, seed=0, **SMALL_OPTIONS[name]).double()
    loss.fit(backbone, images, batch_size=4)
    return loss


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", LOSSES.names())
def test_batched_equals_per_sample_autograd(setup, name):
    """The loss contract: per-sample losses, exact batched gradients, state round trip."""
    backbone, layer, images = setup
    loss = build_loss(name, backbone, images)
    batch = backbone.prepare(images[:4])
    fast = batched_gradients(backbone, layer, loss, batch)
    slow = naive_gradients(backbone, layer, loss, batch)
    assert fast.shape == (4, 32 * 33)
    assert fast.dtype == torch.float64
    assert float(slow.norm(dim=1).min()) > 0  # the oracle is not trivially zero
    for i in range(4):
        assert relative_error(fast[i], slow[i]) <= 1e-5
    restored = create_loss(name, backbone, seed=0, **SMALL_OPTIONS[name]).double()
    restored.load_tensors(dict(loss.state_dict()))  # as a saved extractor reloads it
    assert torch.equal(batched_gradients(backbone, layer, restored, batch), fast)


def test_gradient_matches_finite_differences(setup):
    """An oracle independent of autograd: the directional derivative along a random step."""
    backbone, layer, images = setup
    loss = build_loss("simclr", backbone, images)
    batch = backbone.prepare(images[:1])
    grad = batched_gradients(backbone, layer, loss, batch)[0].reshape(32, 33)
    gen = torch.Generator().manual_seed(0)
    step_w = torch.randn(32, 32, generator=gen, dtype=torch.float64)
    step_b = torch.randn(32, generator=gen, dtype=torch.float64)
    eps = 1e-6

    def value(sign):
        with torch.no_grad():
            layer.weight += sign * eps * step_w
            layer.bias += sign * eps * step_b
            groups = loss.make_views(batch)
            embs = [backbone.embed(g.views).reshape(1, g.views_per_sample, -1) for g in groups]
            out = float(loss(embs)[0])
            layer.weight -= sign * eps * step_w
            layer.bias -= sign * eps * step_b
        return out

    numeric = (value(1) - value(-1)) / (2 * eps)
    analytic = float((grad[:, :32] * step_w).sum() + (grad[:, 32] * step_b).sum())
    assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic))


@pytest.mark.parametrize("name", LOSSES.names())
def test_per_sample_gradient_does_not_depend_on_the_batch(setup, name):
    backbone, layer, images = setup
    loss = build_loss(name, backbone, images)
    alone = batched_gradients(backbone, layer, loss, backbone.prepare(images[2:3]))
    batch = batched_gradients(backbone, layer, loss, backbone.prepare(images[:4]))
    assert torch.allclose(alone[0], batch[2], rtol=1e-10, atol=1e-12)


def test_backward_stops_at_the_layer(setup):
    """The prefix builds no graph even when the model's parameters require grad."""
    backbone, layer, images = setup
    loss = build_loss("kl", backbone, images)
    model = backbone.root
    seen = {}

    def record(module, args, out):
        seen.setdefault("prefix_requires_grad", out.requires_grad)

    handle = model.blocks[0].register_forward_hook(record)
    model.requires_grad_(True)
    try:
        grads = batched_gradients(backbone, layer, loss, backbone.prepare(images[:2]))
    finally:
        model.requires_grad_(False)
        handle.remove()
    assert seen["prefix_requires_grad"] is False
    assert all(p.grad is None for p in model.parameters())
    assert torch.isfinite(grads).all()


def test_tap_refuses_a_layer_the_forward_does_not_use(setup):
    backbone, _, images = setup
    unused = torch.nn.Linear(32, 32).double()
    with LinearTap(unused) as tap, pytest.raises(RuntimeError, match="not used"):
        with tap.forward():
            backbone.embed(backbone.input_view(backbone.prepare(images[:1])))


def test_layer_path_errors_name_the_problem(setup):
    backbone, _, _ = setup
    with pytest.raises(ValueError, match="no module"):
        backbone.resolve_layer("blocks.9.attn.proj")
    with pytest.raises(ValueError, match="nn.Linear"):
        backbone.resolve_layer("blocks.1.norm1")
    assert backbone.resolve_layer(None)[0] == "blocks.1.attn.proj"
