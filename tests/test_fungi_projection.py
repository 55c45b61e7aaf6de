"""The seeded ±1 random projection: exactness, reproducibility, norm preservation."""

import math

import pytest
import torch

from hbird.fungi.projection import RandomProjection, aligned_block_rows


def test_blocks_form_a_sign_matrix_and_match_the_full_product():
    proj = RandomProjection(1000, 24, seed=5, block_rows=96)
    matrix = proj.matrix()
    assert matrix.shape == (1000, 24)
    assert set(matrix.unique().tolist()) == {-1.0, 1.0}
    x = torch.randn(7, 1000, dtype=torch.float64)
    expected = x @ matrix.to(torch.float64) / math.sqrt(24)
    assert torch.allclose(proj(x), expected, rtol=1e-12, atol=1e-12)


def test_same_seed_same_matrix_other_seed_other_matrix():
    a = RandomProjection(500, 16, seed=1, block_rows=64, cache_bytes=0).matrix()
    b = RandomProjection(500, 16, seed=1, block_rows=64, cache_bytes=0).matrix()
    c = RandomProjection(500, 16, seed=2, block_rows=64, cache_bytes=0).matrix()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_blocks_are_regenerated_identically_in_any_order():
    proj = RandomProjection(300, 8, seed=3, block_rows=50, cache_bytes=0)
    forward = [proj.block(k) for k in range(proj.num_blocks)]
    backward = [proj.block(k) for k in reversed(range(proj.num_blocks))][::-1]
    assert all(torch.equal(f, b) for f, b in zip(forward, backward))
    assert all(b.shape[0] <= 50 for b in forward)
    assert not proj._cache  # over the cache budget: nothing kept


def test_large_projection_never_materialises_the_matrix(monkeypatch):
    """A ViT-B sized projection only ever draws blocks of ``block_rows`` rows."""
    d, m = 768 * 769, 768
    proj = RandomProjection(d, m, seed=0)
    assert proj.block_rows * m <= (1 << 21)
    shapes = []
    original = torch.randint

    def spy(*args, **kwargs):
        shapes.append(args[2] if len(args) > 2 else kwargs["size"])
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", spy)
    first = proj.block(0)
    proj.block(proj.num_blocks - 1)
    assert all(rows * cols <= (1 << 21) for rows, cols in shapes)
    # blocks used are kept as int8 (1 byte per entry), handed out in the asked dtype
    assert first.dtype == torch.float32 and set(first.unique().tolist()) == {-1.0, 1.0}
    assert len(proj._cache) == 2
    assert all(block.dtype == torch.int8 for block in proj._cache.values())
    assert torch.equal(proj.block(0), first) and len(shapes) == 2  # no new draw


def test_cached_and_uncached_projections_agree():
    x = torch.randn(3, 700, dtype=torch.float64)
    cached = RandomProjection(700, 12, seed=9, block_rows=100)
    uncached = RandomProjection(700, 12, seed=9, block_rows=100, cache_bytes=0)
    assert torch.equal(cached(x), uncached(x)) and torch.equal(cached(x), uncached(x))
    assert len(cached._cache) == cached.num_blocks and not uncached._cache


def test_norms_are_preserved_in_expectation():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 400, generator=gen, dtype=torch.float64)
    ratios = [
        float(RandomProjection(400, 64, seed=s, block_rows=64)(x).norm() ** 2 / x.norm() ** 2)
        for s in range(300)
    ]
    mean = sum(ratios) / len(ratios)
    # the ratio has variance ~2/m; the mean of 300 draws has sd ~0.01
    assert abs(mean - 1.0) < 0.05


def test_project_outer_equals_projecting_the_materialised_outer_product():
    rows, width, m = 12, 9, 16
    proj = RandomProjection(
        rows * width, m, seed=4, block_rows=aligned_block_rows(width, m, entries=60)
    )
    assert proj.block_rows % width == 0 and proj.num_blocks > 1
    gen = torch.Generator().manual_seed(1)
    g = torch.randn(5, rows, generator=gen, dtype=torch.float64)
    u = torch.randn(5, width, generator=gen, dtype=torch.float64)
    outer = (g[:, :, None] * u[:, None, :]).flatten(1)
    assert torch.allclose(proj.project_outer(g, u), proj(outer), rtol=1e-12, atol=1e-12)


def test_project_outer_needs_row_aligned_blocks():
    proj = RandomProjection(12 * 9, 4, seed=0, block_rows=10)
    with pytest.raises(ValueError, match="aligned_block_rows"):
        proj.project_outer(torch.zeros(2, 12), torch.zeros(2, 9))


def test_wrong_input_width_is_refused():
    with pytest.raises(ValueError, match=r"\(N, 10\)"):
        RandomProjection(10, 4, seed=0)(torch.zeros(3, 11))
