"""scikit-learn's estimator contract for InContextPredictor (hbird.testing.check_predictor)."""

import pytest
import torch

from hbird import InContextPredictor
from hbird.testing import check_params_stored, check_predictor, check_refit


def maker(cls=InContextPredictor, **kw):
    settings = dict(encoder="test_vit", layers=0, image_size=64, k=10, temperature=0.05)
    return lambda: cls(**settings, index="exact", progress=False, **kw)


@pytest.fixture(scope="module")
def prompts(scenes):
    """Two disjoint prompts of 10 fully labelled scenes (so banks of equal size), 3 queries."""
    prompt, queries = scenes
    first = ([s.image for s in prompt[:10]], [s.mask for s in prompt[:10]], {"num_classes": 4})
    second = ([s.image for s in prompt[10:]], [s.mask for s in prompt[10:]], {"num_classes": 4})
    return first, second, [s.image for s in queries[:3]]


def test_predictor_passes_the_contract(prompts):
    check_predictor(maker(), *prompts)
    check_predictor(maker(memory_size=150, aug_epochs=2, index_params={}), *prompts)


def test_refit_of_the_same_size_recomputes_the_key_norms(prompts):
    """The norms were cached by length only, so a refit with a prompt of the same size kept
    the first prompt's (an error of about 2e-4 in the cosines)."""
    (images_a, labels_a, kw), (images_b, labels_b, _), queries = prompts
    p = maker()().fit(images_a, labels_a, **kw)
    p.predict(queries)
    size = len(p.bank_)
    p.fit(images_b, labels_b, **kw)
    p.predict(queries)
    assert len(p.bank_) == size  # the case the old cache got wrong
    direct = torch.linalg.vector_norm(p.bank_.keys.to(torch.float32), dim=-1)
    assert torch.equal(p.key_norms_, direct)


class StaleNorms(InContextPredictor):
    """The old cache (by length only), to show the refit check catches it."""

    def _key_norms(self):
        norms = getattr(self, "cached_norms", None)
        if norms is None or len(norms) != len(self.bank_):
            norms = self.cached_norms = self.bank_.key_norms()
        return norms


def test_the_checks_fail_on_a_predictor_that_breaks_the_contract(prompts):
    with pytest.raises(AssertionError, match="stale state"):
        check_refit(maker(StaleNorms), *prompts)

    class Copies(InContextPredictor):
        def get_params(self):
            return {**super().get_params(), "index_params": dict(self.index_params or {})}

    with pytest.raises(AssertionError, match="index_params"):
        check_params_stored(maker(Copies)())
