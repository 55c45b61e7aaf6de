"""ReCo's co-segmentation on tiny hand-made tensors (issue 11, steps 4-7; supplement Alg. 1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hbird.zeroshot.cosegment import (
    affinity_grid,
    class_scores,
    context_weights,
    cosegment,
    language_weights,
    seed_reference,
    seed_scores,
    select_seeds,
)


def _naive_grid(features, weights=None, official=False):
    """Alg. 1 written out with loops over the full A (the oracle)."""
    k, h, w, d = features.shape
    hw = h * w
    x = features.reshape(k * hw, d).double()
    a = x @ x.T
    if weights is not None:
        a = a * weights.reshape(1, -1).double()
    grid = torch.zeros(k * hw, k, dtype=torch.float64)
    for i in range(k):
        start, end = i * hw, (i + 1) * hw
        cols = a[:, start : start + end] if official else a[:, start:end]
        grid[:, i] = cols.max(dim=1).values
    return grid


def _random_archive(k=4, h=3, w=2, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(k, h, w, d, generator=g), dim=-1)


@pytest.mark.parametrize("official", [False, True])
@pytest.mark.parametrize("chunk_rows", [1, 5, 1000])
def test_grid_matches_loop_oracle_in_any_chunking(official, chunk_rows):
    """G against Alg. 1's loops over the full A, for both slices, with column weights."""
    feats = _random_archive()
    weights = torch.rand(4, 3, 2, generator=torch.Generator().manual_seed(1))
    got = affinity_grid(feats, weights, chunk_rows=chunk_rows, official_grid=official)
    torch.testing.assert_close(got.double(), _naive_grid(feats, weights, official))


def _slice_case():
    """Three images of two pixels in R^3. Image 0: a = e1, b = (0, .8, .6); image 1: e1, e1;
    image 2: e2, e2. Hand-computed s (mean over images of the best affinity):
    correct slice  s_a = (1 + 1 + 0)/3 = 0.667, s_b = (1 + 0 + .8)/3 = 0.6   → seed a;
    official slice (image 1's max runs over images 1..2): s_a = 2/3,
    s_b = (1 + max(0, .8) + .8)/3 = 0.867 → seed b."""
    e1, e2, b = torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]), torch.tensor([0, 0.8, 0.6])
    return torch.stack([torch.stack([e1, b]), torch.stack([e1, e1]), torch.stack([e2, e2])])[
        :, None
    ]  # (3, 1, 2, 3)


def test_official_slice_gives_a_different_seed_than_the_correct_one():
    feats = _slice_case()
    correct = cosegment(feats)
    official = cosegment(feats, official_grid=True)
    torch.testing.assert_close(correct.scores[0, 0], torch.tensor([2 / 3, 0.6]))
    torch.testing.assert_close(official.scores[0, 0], torch.tensor([2 / 3, 2.6 / 3]))
    assert correct.seeds[0].tolist() == [0]
    assert official.seeds[0].tolist() == [1]


def test_zero_weight_on_an_image_removes_it_from_g():
    """Column weighting: with image 2's weights at 0, G[:, 2] is 0 and s is the mean of the
    other images' maxima (computed from the features without image 2's columns)."""
    feats = _random_archive(k=3, h=2, w=2, d=4, seed=3)
    weights = torch.ones(3, 2, 2)
    weights[2] = 0
    grid = affinity_grid(feats, weights)
    assert torch.all(grid[:, 2] == 0)
    x = feats.reshape(12, 4)
    kept = x @ x[:8].T  # columns of images 0 and 1 only
    expected = torch.stack([kept[:, :4].max(1).values, kept[:, 4:].max(1).values], 1).sum(1) / 3
    torch.testing.assert_close(seed_scores(grid, (3, 2, 2)).reshape(-1), expected)


def test_seeds_and_reference():
    scores = torch.tensor([[[0.1, 0.9], [0.5, 0.2]], [[0.3, 0.0], [0.4, 0.8]]])
    assert select_seeds(scores, 1).tolist() == [[1], [3]]
    assert select_seeds(scores, 2).tolist() == [[1, 2], [3, 2]]
    with pytest.raises(ValueError, match="n_seeds"):
        select_seeds(scores, 5)
    feats = _random_archive(k=2, h=2, w=2, d=3, seed=4)
    ref = seed_reference(feats, torch.tensor([[1], [3]]))
    expected = feats[0, 0, 1] + feats[1, 1, 1]
    torch.testing.assert_close(ref, expected / expected.norm())
    assert ref.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_reference_is_unit_norm_for_any_seed_count():
    feats = _random_archive(k=5, h=3, w=3, d=8, seed=5)
    for n in (1, 3, 9):
        result = cosegment(feats, n_seeds=n)
        assert result.seeds.shape == (5, n)
        assert result.reference.norm().item() == pytest.approx(1.0, abs=1e-6)


def test_language_weights_are_sigmoid_of_ten_cosines_resized():
    """Step 5 by hand: dense cosines 0.3 and -0.2 give σ(3) and σ(-2); a constant map
    stays constant after the bilinear resize; all weights lie in [0, 1]."""
    text = torch.tensor([1.0, 0.0])
    dense = torch.tensor([[[[0.3, 0.0], [-0.2, 0.0]]]])  # (1, 1, 2, 2): two locations
    got = language_weights(dense, text, size=(1, 2))
    torch.testing.assert_close(
        got, torch.tensor([[[1 / (1 + math.exp(-3)), 1 / (1 + math.exp(2))]]])
    )
    flat = torch.full((2, 2, 2, 2), 0.5)
    torch.testing.assert_close(
        language_weights(flat, text, (5, 7)), torch.full((2, 5, 7), 1 / (1 + math.exp(-5)))
    )
    rand = F.normalize(torch.randn(3, 4, 4, 6), dim=-1)
    w = language_weights(rand, F.normalize(torch.randn(6), dim=0), (9, 9))
    assert w.min() >= 0 and w.max() <= 1


def test_context_weights_are_the_product_of_one_minus_sigmoids():
    """Step 6 by hand: cosines 0.5 with context 1 and -1 with context 2 give
    (1 − σ(0.5/τ)) · (1 − σ(−1/τ)); τ = 1 reaches only about 0.27–0.73 per context."""
    feats = torch.tensor([[[[1.0, 0.0]]]])  # (1, 1, 1, 2)
    refs = torch.tensor([[0.5, math.sqrt(0.75)], [-1.0, 0.0]])
    sig = lambda v: 1 / (1 + math.exp(-v))  # noqa: E731
    for tau in (1.0, 0.1):
        expected = (1 - sig(0.5 / tau)) * (1 - sig(-1 / tau))
        assert context_weights(feats, refs, tau).item() == pytest.approx(expected, rel=1e-5)
    assert torch.all(context_weights(feats, refs[:0]) == 1)
    w = context_weights(_random_archive(), F.normalize(torch.randn(5, 5), dim=-1))
    assert w.min() >= 0 and w.max() <= 1


def test_class_scores_are_sigmoid_cosines():
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1, 2, 2)
    refs = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    got = class_scores(feats, refs)
    expected = torch.sigmoid(torch.tensor([[[1.0, 0.0]], [[0.6, 0.8]]]))
    torch.testing.assert_close(got, expected)
