"""The feature-extractor contract, for every registered extractor."""

import pytest
import torch

from hbird import InContextPredictor
from hbird.data.transforms import resize_for_encoder
from hbird.encoders import create_encoder
from hbird.features import FEATURE_EXTRACTORS, create_extractor


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("test_vit")  # patch 8, width 32


@pytest.mark.parametrize("name", FEATURE_EXTRACTORS.names())
def test_extractor_contract(name, encoder, scenes, tmp_path):
    prompt, queries = scenes
    extractor = create_extractor(name, encoder, batch_size=2, seed=0)
    views = [resize_for_encoder(s.image, 64, encoder.patch_size) for s in prompt[:4]]
    assert extractor.fit(iter(views)) is extractor
    # 64x80 scenes → 8x10 patches of 8 pixels
    odd = torch.rand(3, 48, 40)
    maps = extractor.transform([views[0], odd, views[1]])
    d = extractor.feature_dim
    assert d == {"patch": 32, "fungi": 2 * 32}.get(name, d)  # FUNGI: [patch, gradient] (B.2)
    assert [tuple(m.shape) for m in maps] == [(8, 10, d), (6, 5, d), (8, 10, d)]
    assert all(m.dtype == torch.float32 and m.device.type == "cpu" for m in maps)
    alone = extractor.transform([views[1]])[0]  # a view's features ignore its batch mates
    torch.testing.assert_close(alone, maps[2], rtol=1e-4, atol=1e-5)
    restored = create_extractor(name, encoder, batch_size=2, seed=0).load_state(extractor.state())
    assert restored.identity() == extractor.identity() and restored.identity()["name"] == name
    assert torch.equal(restored.transform([odd])[0], maps[1])

    # the predictor holds it: fit, save, load back with identical predictions
    settings = dict(encoder="test_vit", image_size=64, k=5, index="exact", batch_size=4)
    p = InContextPredictor(**settings, features=name, progress=False)
    p.fit([s.image for s in prompt[:4]], [s.mask for s in prompt[:4]], num_classes=4)
    assert p.bank_.feature_dim == p.extractor_.feature_dim == extractor.feature_dim
    images = [s.image for s in queries[:2]]
    loaded = InContextPredictor.load(p.save(tmp_path / "bank"), progress=False)
    assert loaded.extractor_.identity() == p.extractor_.identity()
    for a, b in zip(p.predict_dense(images), loaded.predict_dense(images)):
        assert torch.equal(a.patch_labels, b.patch_labels)
