"""The feature cache: a hit returns exactly what the extractor computes, and only then."""

import pytest
import torch

from hbird.encoders import create_encoder
from hbird.errors import InputError
from hbird.features import FEATURE_EXTRACTORS, create_extractor
from hbird.features.cache import CachedFeatures, FeatureCache


class CountingExtractor:
    """Wraps an extractor and counts the views that reach it."""

    def __init__(self, extractor):
        self.extractor, self.encoder, self.seen = extractor, extractor.encoder, 0
        self.feature_dim = extractor.feature_dim

    def fit(self, views):
        self.extractor.fit(views)
        return self

    def transform(self, views):
        self.seen += len(views)
        return self.extractor.transform(views)

    def identity(self):
        return self.extractor.identity()

    def state(self):
        return self.extractor.state()

    def load_state(self, state):
        self.extractor.load_state(state)
        return self


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("test_vit")  # patch 8, width 32


def views(seed, n=3, size=(3, 32, 40)):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, generator=g) for _ in range(n)]


@pytest.mark.parametrize("name", FEATURE_EXTRACTORS.names())
def test_cached_features_equal_recomputed_ones(name, encoder, tmp_path):
    """Oracle: the uncached extractor. Hits, misses and a mixed call all agree with it."""
    plain = create_extractor(name, encoder, batch_size=2, seed=0).fit(iter(views(9)))
    inner = CountingExtractor(create_extractor(name, encoder, batch_size=2, seed=0))
    cached = CachedFeatures(inner, tmp_path / "cache").fit(iter(views(9)))
    first, second = views(1), views(2)
    expected = plain.transform(first + second)

    got_first = cached.transform(first)
    assert inner.seen == 3
    mixed = cached.transform([second[0], first[1], second[1], first[0], second[2]])
    assert inner.seen == 6  # only the three new views were computed
    again = cached.transform(first + second)
    assert inner.seen == 6 and cached.cache.hits == 2 + 6 and cached.cache.misses == 6
    for got, want in zip(got_first + again, expected[:3] + expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for got, want in zip(mixed, [expected[i] for i in (3, 1, 4, 0, 5)], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert cached.identity() == plain.identity() and cached.feature_dim == plain.feature_dim


def test_a_changed_view_setting_or_weights_is_a_miss(encoder, tmp_path):
    """The key covers the view's pixels and size, the layers and the encoder's weights."""
    base = views(3, n=1)
    cache = FeatureCache(tmp_path / "cache")
    counting = CountingExtractor(create_extractor("patch", encoder))
    CachedFeatures(counting, cache).transform(base)
    nudged = base[0].clone()
    nudged[0, 0, 0] += 1e-3
    CachedFeatures(counting, cache).transform([nudged])  # one pixel changed
    CachedFeatures(counting, cache).transform([base[0][:, :24, :]])  # another size
    assert counting.seen == 3
    other_layer = CountingExtractor(create_extractor("patch", encoder, layers=0))
    CachedFeatures(other_layer, cache).transform(base)
    assert other_layer.seen == 1
    other_weights = create_encoder("test_vit", seed=1)
    assert other_weights.identity()["weights_hash"] != encoder.identity()["weights_hash"]
    other = CountingExtractor(create_extractor("patch", other_weights))
    out = CachedFeatures(other, cache).transform(base)[0]
    assert other.seen == 1
    assert torch.equal(out, create_extractor("patch", other_weights).transform(base)[0])
    assert len(cache.entries()) == 5


def test_size_limit_drops_least_recently_used(encoder, tmp_path):
    first = views(4, n=1)
    cache = FeatureCache(tmp_path / "cache")
    cached = CachedFeatures(create_extractor("patch", encoder), cache)
    cached.transform(first)
    entry_size = cache.size_bytes()
    cache.max_bytes = 2 * entry_size  # room for two entries
    cached.transform(views(5, n=1))
    cached.transform(first)  # read: now the most recent
    cached.transform(views(6, n=1))  # a third entry: the unread second one goes
    assert cache.size_bytes() <= cache.max_bytes and len(cache.entries()) == 2
    hits = cache.hits
    cached.transform(first)
    assert cache.hits == hits + 1


def test_an_unreadable_entry_is_recomputed(encoder, tmp_path):
    inner = CountingExtractor(create_extractor("patch", encoder))
    cached = CachedFeatures(inner, tmp_path / "cache")
    want = cached.transform(views(7, n=1))[0]
    (entry,) = cached.cache.entries()
    entry.write_bytes(b"not a safetensors file")
    got = cached.transform(views(7, n=1))[0]
    assert inner.seen == 2 and torch.equal(got, want)


def test_bad_cache_settings_are_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        FeatureCache(tmp_path / "file")
    with pytest.raises(InputError, match="must be positive"):
        FeatureCache(tmp_path / "cache", max_bytes=0)


def test_predictor_with_a_feature_cache_predicts_the_same_and_skips_the_encoder(
    scenes, tmp_path, monkeypatch
):
    """A second fit and predict over the same images (other k and β) reads every view from
    the cache: the encoder is never called, and predictions equal an uncached predictor's."""
    from hbird import InContextPredictor

    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:4]], [s.mask for s in prompt[:4]]
    queries = [s.image for s in queries[:2]]
    settings = dict(encoder="test_vit", image_size=64, index="exact", progress=False)

    def fitted(**kwargs):
        return InContextPredictor(**settings, **kwargs).fit(images, masks, num_classes=4)

    cache = tmp_path / "cache"
    fitted(feature_cache=cache, k=5).predict(queries)
    encoder = create_encoder("test_vit")
    calls = []
    forward = type(encoder).forward_patches
    monkeypatch.setattr(
        type(encoder), "forward_patches", lambda *a, **kw: calls.append(1) or forward(*a, **kw)
    )
    again = fitted(feature_cache=cache, k=3, temperature=0.1).predict(queries)
    assert calls == []
    plain = fitted(k=3, temperature=0.1).predict(queries)
    assert calls  # the uncached predictor did encode
    assert all(torch.equal(a, b) for a, b in zip(again, plain, strict=True))
