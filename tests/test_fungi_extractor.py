"""FungiExtractor on images and texts: shapes, determinism, batching, save/load, errors."""

import pytest
import torch

from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.errors import InputError
from hbird.fungi import EMBEDDING, FungiExtractor, batched_gradients, naive_gradients
from hf_models import save_tiny
from text_models import TEXTS, tiny_text_backbone

OPTIONS = {"dino": {"num_local": 4, "local_size": 16}, "simclr": {"num_negative_inputs": 4}}


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(10, seed=11, size=(40, 48))]


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("test_vit")


def make(encoder, seed=0, **kwargs):
    kwargs.setdefault("loss_options", OPTIONS)
    return FungiExtractor(encoder, seed=seed, image_size=32, batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def fitted(encoder, images):
    return make(encoder).fit(images[:8])


def test_features_are_parts_concatenated_and_normalised(fitted, images):
    parts = fitted.extract_parts(images[8:])
    assert list(parts) == ["kl", "dino", "simclr", EMBEDDING]
    for part in parts.values():
        assert part.shape == (2, 32)
        assert torch.allclose(part.norm(dim=1), torch.ones(2))
    feats = fitted.transform(images[8:])
    assert feats.shape == (2, fitted.feature_dim) == (2, 128)
    expected = torch.cat(list(parts.values()), dim=1) / 2.0  # four unit parts
    assert torch.allclose(feats, expected, atol=1e-6)
    # the parts differ from one another: the gradients are not the embedding again
    assert float((parts["kl"] * parts["dino"]).sum(1).abs().max()) < 0.99


def test_same_seed_gives_bit_identical_features(encoder, images):
    a = make(encoder, seed=3).fit(images[:8]).transform(images[8:])
    b = make(encoder, seed=3).fit(images[:8]).transform(images[8:])
    c = make(encoder, seed=4).fit(images[:8]).transform(images[8:])
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_features_do_not_depend_on_the_batch(fitted, images):
    together = fitted.transform(images[6:10])
    alone = torch.cat([fitted.transform([image]) for image in images[6:10]])
    assert torch.allclose(together, alone, atol=1e-5)


def test_passes_of_few_views_give_the_same_features(encoder, images):
    few = make(encoder, max_pass_elements=3 * 32 * 32).fit(images[:8])  # one sample per pass
    assert torch.allclose(
        few.transform(images[6:]), make(encoder).fit(images[:8]).transform(images[6:]), atol=1e-5
    )


def test_batched_features_equal_the_naive_loop(fitted, images):
    fast = fitted.extract_parts(images[8:])
    slow = fitted.extract_parts(images[8:], gradients="naive")
    for name in fast:
        assert torch.allclose(fast[name], slow[name], atol=1e-4), name


def test_pca_is_fitted_on_training_features(encoder, images):
    fx = make(encoder, losses=("kl", "simclr"), pca_dim=6)
    train = fx.fit_transform(images[:8])
    assert train.shape == (8, 6) and fx.feature_dim == 6
    assert torch.allclose(train.norm(dim=1), torch.ones(8), atol=1e-5)
    assert torch.allclose(fx.transform(images[:8]), train, atol=1e-5)
    with pytest.raises(ValueError, match="at least"):
        make(encoder, losses=("kl",), pca_dim=20).fit(images[:8])


def test_save_and_load_round_trip(fitted, encoder, images, tmp_path):
    path = fitted.save(tmp_path / "fx")
    assert (path / "fungi.json").is_file() and (path / "tensors.safetensors").is_file()
    loaded = FungiExtractor.load(path, encoder)
    assert torch.equal(loaded.transform(images[8:]), fitted.transform(images[8:]))
    with pytest.raises(InputError, match="same model"):
        FungiExtractor.load(path, create_encoder("test_vit", seed=1))
    with pytest.raises(InputError, match="not a saved FUNGI"):
        FungiExtractor.load(tmp_path, encoder)


def test_embedding_only_and_bad_arguments(encoder, images):
    only = make(encoder, losses=()).fit(images[:2])
    assert only.transform(images[:2]).shape == (2, 32)
    with pytest.raises(ValueError, match="unknown FUNGI loss"):
        make(encoder, losses=("byol",)).fit(images[:2])
    with pytest.raises(ValueError, match="not FUNGI losses"):
        make(encoder, losses=("kl",), loss_options={"simclrr": {}}).fit(images[:2])
    with pytest.raises(RuntimeError, match="not fitted"):
        make(encoder).transform(images[:2])


def test_bf16_autocast_runs_and_stays_close(encoder, images):
    full = make(encoder, losses=("kl", "simclr")).fit(images[:8])
    half = make(encoder, losses=("kl", "simclr"), autocast="bf16").fit(images[:8])
    assert half.config()["autocast"] == "bf16"
    a, b = full.extract_parts(images[8:]), half.extract_parts(images[8:])
    for name in a:
        assert torch.isfinite(b[name]).all()
        assert float((a[name] * b[name]).sum(1).min()) > 0.9, name


# -- texts --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_backbone(tmp_path_factory):
    pytest.importorskip("transformers")
    return tiny_text_backbone(tmp_path_factory.mktemp("bert"))


def test_text_gradients_match_per_sample_autograd(text_backbone):
    fx = FungiExtractor(
        text_backbone, losses=("kl", "simclr"), loss_options={"simclr": {"text_views": 4}}
    ).fit(TEXTS)
    assert fx.layer_name_ == "encoder.layer.1.attention.output.dense"
    batch = text_backbone.prepare(TEXTS[:4])  # different lengths: padded in the batch
    for loss in fx.losses_.values():
        fast = batched_gradients(text_backbone, fx.layer_, loss, batch)
        slow = naive_gradients(text_backbone, fx.layer_, loss, batch)
        assert float(slow.norm(dim=1).min()) > 0
        for i in range(4):
            assert float((fast[i] - slow[i]).norm() / slow[i].norm()) <= 1e-5
    feats = fx.transform(TEXTS[4:])
    assert feats.shape == (2, 96)
    assert torch.equal(feats, fx.transform(TEXTS[4:]))


def test_dino_refuses_texts(text_backbone):
    with pytest.raises(ValueError, match="image"):
        FungiExtractor(text_backbone, losses=("dino",)).fit(TEXTS)


@pytest.mark.parametrize("kind", ["dinov2", "clip_vision"])
def test_hugging_face_vision_encoders(kind, images, tmp_path):
    pytest.importorskip("transformers")
    save_tiny(tmp_path, kind)
    layer = {  # module paths differ between transformers versions
        "dinov2": ("encoder.layer.1.attention.output.dense", "encoder.layer.1.attention.o_proj"),
        "clip_vision": (
            "vision_model.encoder.layers.1.self_attn.out_proj",
            "encoder.layers.1.self_attn.out_proj",
        ),
    }[kind]
    encoder = create_encoder(f"hf:{tmp_path}", pretrained=True)
    fx = FungiExtractor(encoder, losses=("kl",), image_size=32).fit(images[:2])
    assert fx.layer_name_ in layer
    batch = fx.backbone_.input_view(fx.backbone_.prepare(images[:2]))  # (2, 3, 32, 32)
    with torch.no_grad():
        out = encoder.model(pixel_values=encoder.normalize(batch))
        expected = out.pooler_output if kind == "clip_vision" else out.last_hidden_state[:, 0]
        assert torch.allclose(fx.backbone_.embed(batch), expected, atol=1e-5)
    (loss,) = fx.losses_.values()
    fast = batched_gradients(fx.backbone_, fx.layer_, loss, batch)
    slow = naive_gradients(fx.backbone_, fx.layer_, loss, batch)
    assert float((fast - slow).norm() / slow.norm()) <= 1e-4
