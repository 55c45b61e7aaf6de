"""The class-token tail (hbird.fungi.class_token) against the whole last block: the
oracle is timm's own forward, and plain autograd through it (``gradients="naive"``)."""

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.fungi import FungiExtractor
from hbird.fungi.class_token import class_token_embedding, class_token_tail_applies

OPTIONS = {"dino": {"num_local": 2, "local_size": 16}, "simclr": {"num_negative_inputs": 3}}


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("test_vit")


def test_class_token_embedding_equals_the_whole_forward(encoder):
    model = encoder.model
    assert class_token_tail_applies(model)
    x = torch.randn(3, 3, 32, 32)
    seen = []
    hook = model.blocks[-1].mlp.register_forward_hook(lambda m, a, out: seen.append(a[0].shape))
    with torch.no_grad():
        fast = class_token_embedding(model, x)
        hook.remove()
        full = model.forward_head(model.forward_features(x), pre_logits=True)
    assert seen == [torch.Size([3, 1, model.embed_dim])]  # the MLP saw the class token only
    assert fast.shape == full.shape == (3, model.embed_dim)
    assert torch.allclose(fast, full, atol=1e-5)
    assert "forward" not in vars(model.blocks[-1])  # the block's own forward is back


def test_gradients_with_the_tail_equal_autograd_through_the_whole_model(encoder):
    """Every FUNGI part with the tail (batched) against plain autograd of the whole
    forward (``gradients="naive"``, tail off), and against the batched path without it."""
    images = [s.image for s in make_scenes(6, seed=5, size=(40, 48))]
    fx = FungiExtractor(encoder, seed=0, image_size=32, batch_size=3, loss_options=OPTIONS)
    fx.fit(images[:3])
    assert fx.backbone_.class_token_tail
    fast = fx.extract_parts(images[3:])
    fx.backbone_.class_token_tail = False
    try:
        naive = fx.extract_parts(images[3:], gradients="naive")
        whole = fx.extract_parts(images[3:])
    finally:
        fx.backbone_.class_token_tail = True
    for name in fast:
        assert torch.allclose(fast[name], naive[name], atol=1e-4), name
        assert torch.allclose(fast[name], whole[name], atol=1e-5), name


def test_the_tail_is_not_used_where_other_tokens_matter():
    pooled = VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, global_pool="avg"
    ).eval()
    assert not class_token_tail_applies(pooled)  # the average reads every token
    token = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
    assert not class_token_tail_applies(token.train())  # dropout, stochastic depth
    assert class_token_tail_applies(token.eval())
