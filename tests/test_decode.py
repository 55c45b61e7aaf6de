"""Eq. 1 of Balazevic et al. (2023, §3.1) and upsampling, pinned to hand-computed values."""

import math

import pytest
import torch

from hbird.decode import (
    _channels_first,
    _linear_taps,
    _rows_match_torch,
    _torch_kernel,
    aggregate,
    decode_dense,
    neighbour_attention,
    softmax_over_neighbours,
    upsample,
    upsample_argmax,
)


def test_eq1_weights_by_hand():
    q = torch.tensor([[2.0, 0.0]])  # normalised to (1, 0)
    keys = torch.tensor([[[1.0, 0.0], [0.0, 3.0]]])  # cosines 1 and 0
    w = neighbour_attention(q, keys, temperature=0.5)
    e2 = math.exp(2.0)
    assert w[0].tolist() == pytest.approx([e2 / (e2 + 1), 1 / (e2 + 1)])
    values = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert aggregate(w, values)[0].tolist() == pytest.approx([e2 / (e2 + 1), 1 / (e2 + 1)])


def test_eq1_from_cosines_by_hand():
    """softmax_k(cos / β) (eq. 1) from given cosines 0.9 and 0.5 at β = 0.1."""
    w = softmax_over_neighbours(torch.tensor([[0.9, 0.5]]), temperature=0.1)
    e4 = math.exp(4.0)
    assert w[0].tolist() == pytest.approx([e4 / (e4 + 1), 1 / (e4 + 1)])
    masked = softmax_over_neighbours(torch.tensor([[0.9, 0.5]]), 0.1, torch.tensor([[False, True]]))
    assert masked.tolist() == [[0.0, 1.0]]
    with pytest.raises(ValueError, match="temperature"):
        softmax_over_neighbours(torch.tensor([[0.9]]), 0.0)


def test_eq1_temperature_limits():
    q = torch.tensor([[1.0, 0.2]])
    keys = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    sharp = neighbour_attention(q, keys, temperature=1e-4)
    assert sharp.argmax().item() == 0 and sharp.max().item() == pytest.approx(1.0)
    flat = neighbour_attention(q, keys, temperature=1e4)
    assert torch.allclose(flat, torch.full((1, 3), 1 / 3), atol=1e-4)


def test_eq1_masks_padding():
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    w = neighbour_attention(q, keys, 0.02, valid=torch.tensor([[True, False]]))
    assert w.tolist() == [[1.0, 0.0]]


def test_bilinear_upsampling_by_hand():
    patch = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[..., None]  # (h, w, C=1)
    up = upsample(patch, (4, 4))[0]
    rows = torch.tensor([0.0, 0.5, 1.5, 2.0])
    cols = torch.tensor([0.0, 0.25, 0.75, 1.0])
    assert torch.allclose(up, rows[:, None] + cols[None, :])


def test_decode_segmentation_argmax_and_confidence_at_original_size():
    soft = torch.zeros(2, 3, 2)
    soft[..., 0] = 0.8
    soft[..., 1] = 0.2
    soft[1, 2] = torch.tensor([0.1, 0.9])
    pred = decode_dense(soft, (20, 30), classification=True)
    assert pred.labels.shape == (20, 30) and pred.labels.dtype == torch.int64
    assert pred.labels[0, 0] == 0 and pred.labels[-1, -1] == 1
    assert pred.confidence[0, 0] == pytest.approx(0.8)


def test_decode_regression_values():
    soft = torch.full((2, 2, 1), 3.5)
    pred = decode_dense(
        soft, (7, 9), classification=False, patch_confidence=torch.full((2, 2), 0.4)
    )
    assert pred.labels.shape == (7, 9)
    assert torch.allclose(pred.labels, torch.full((7, 9), 3.5))
    assert torch.allclose(pred.confidence, torch.full((7, 9), 0.4))


# -- upsample + argmax without the (C, H, W) map ---------------------------------------


def _oracle(patch: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's decode: label distributions upsampled (``F.interpolate``, bilinear,
    ``align_corners=False``), then the per-pixel max and its first index."""
    x = patch.permute(2, 0, 1)[None].float()
    up = torch.nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return up[0].max(dim=0)


SHAPES = [  # (h, w, C, H, W)
    (32, 32, 21, 512, 512),  # the benchmark's ViT-B/16 at 512 px
    pytest.param((32, 32, 150, 512, 512), marks=pytest.mark.slow),  # ADE20K's classes
    (16, 16, 150, 256, 250),  # ADE20K's classes, smaller
    (31, 17, 1, 513, 257),  # one class, odd sizes
    (24, 37, 6, 375, 500),  # non-square, non-integer factors
    (28, 28, 300, 100, 123),  # many classes, factor < 4 (gathered row tiles)
    (40, 40, 8, 100, 90),  # downsampling-ish small factors
    (3, 3, 4, 1000, 7),  # downsampled width, tall output
    (10, 13, 2, 70, 65),  # output sum just over 128
    (32, 32, 5, 32, 200),  # equal height: the copy case
    (7, 5, 3, 230, 410),  # three classes: the kernel depends on the thread count
    (1, 1, 5, 300, 200),  # one patch
    (8, 8, 4, 50, 60),  # small output
    (20, 20, 8, 50, 90),  # 8 channels: the compiler-vectorized remainder
    (16, 16, 31, 200, 201),  # 16 vectorized + 8 + 7 scalar channels
    (16, 16, 2, 200, 64),  # two classes: torch's generic kernel
]


def _check_against_oracle(shape: tuple[int, ...], threads: int) -> None:
    h, w, c, height, width = shape
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        patch = torch.rand(h, w, c, generator=torch.Generator().manual_seed(sum(shape)))
        patch = torch.softmax(patch * 8, dim=-1)  # peaked like eq.-1 outputs
        want, got = _oracle(patch, (height, width)), upsample_argmax(patch, (height, width))
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert got[1].dtype == torch.int64 and got[0].shape == (height, width)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize(
    "shape", SHAPES, ids=lambda s: "x".join(map(str, getattr(s, "values", [s])[0]))
)
def test_upsample_argmax_is_bit_identical_to_interpolate_then_max(shape):
    """``upsample_argmax`` equals ``F.interpolate(bilinear, align_corners=False)`` then
    ``max(dim=0)`` bit for bit: values and first-max labels, on random soft labels."""
    _check_against_oracle(shape, threads=1)


@pytest.mark.parametrize(
    "shape", [(7, 5, 3, 230, 410), (16, 16, 21, 256, 256), (16, 16, 2, 200, 64)]
)
def test_upsample_argmax_on_two_threads(shape):
    """The same on two threads (torch's kernel choice for three classes depends on it)."""
    _check_against_oracle(shape, threads=2)


@pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() != "AVX512", reason="tiled path measured on AVX512"
)
def test_shapes_exercise_both_tiled_kernels():
    """SHAPES run the tiled path (else the test above compares the oracle with itself),
    through both of torch's kernels it reproduces, and the one-off check passes here."""
    shapes = [getattr(s, "values", [s])[0] for s in SHAPES]
    kernels = {_torch_kernel(_channels_first(torch.zeros(s[:3])), s[3:]) for s in shapes}
    assert kernels == {"generic", "channels_last"} and _rows_match_torch()


def test_upsample_argmax_ties_take_the_first_class():
    """Exact ties everywhere (duplicated class channels, all-equal rows, one-hot patches
    with zeros elsewhere): the first maximal class wins, as in ``torch.max``."""
    gen = torch.Generator().manual_seed(3)
    base = torch.rand(32, 32, 7, generator=gen)
    tied = torch.cat([base[..., :3], base[..., 2:3], base[..., 3:], base[..., 2:3]], dim=-1)
    uniform = torch.full((32, 32, 21), 1 / 21)
    onehot = torch.nn.functional.one_hot(torch.randint(0, 4, (16, 16), generator=gen), 9)
    negative = -torch.rand(20, 30, 5, generator=gen).round(decimals=1)  # many equal values
    for patch, size in [
        (tied, (512, 512)),
        (uniform, (300, 200)),
        (onehot, (257, 255)),
        (negative, (99, 401)),
    ]:
        want, got = _oracle(patch, size), upsample_argmax(patch, size)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    # five equal channels are summed in the same (scalar) order: an exact tie everywhere;
    # at 21 classes the vectorized channels round differently, as in torch itself
    assert (upsample_argmax(torch.full((32, 32, 5), 0.2), (300, 200))[1] == 0).all()


def test_linear_taps_by_hand():
    """The bilinear definition (torch's CPU kernel, ``align_corners=False``): output
    pixel o of n_out samples the input at ``src = max(0, (n_in / n_out)(o + ½) − ½)``,
    between ``i0 = min(⌊src⌋, n_in − 1)`` and ``i1 = i0 + 1`` (``i0`` at the last pixel),
    with weights ``w1 = src − i0``, ``w0 = 1 − w1``. For 2 → 5: src = 0 (clamped from
    −0.3), 0.1, 0.5, 0.9, 1.3 (bottom border: both taps on pixel 1, w1 = 0.3)."""
    i0, i1, w0, w1 = _linear_taps(2, 5)
    assert i0.tolist() == [0, 0, 0, 0, 1] and i1.tolist() == [1, 1, 1, 1, 1]
    want = torch.tensor([0.0, 0.1, 0.5, 0.9, 0.3])
    assert torch.allclose(w1, want, atol=1e-6) and torch.allclose(w0, 1 - want, atol=1e-6)
    assert [t.tolist() for t in _linear_taps(3, 3)] == [[0, 1, 2], [0, 1, 2], [1, 1, 1], [0, 0, 0]]


def test_upsample_argmax_against_a_naive_float64_loop():
    """An independent oracle: the definition above evaluated per pixel in float64 (a
    plain loop); the fast path's values agree to float32 rounding, and its labels are
    the loop's wherever the loop's top two classes are not within rounding."""
    gen = torch.Generator().manual_seed(5)
    patch = torch.rand(5, 6, 4, generator=gen, dtype=torch.float64)
    size = (97, 61)
    values, labels = upsample_argmax(patch, size)

    def taps(n_in: int, n_out: int, o: int) -> tuple[int, int, float]:
        src = max(0.0, n_in / n_out * (o + 0.5) - 0.5)
        i0 = min(int(math.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for y in range(size[0]):
        y0, y1, b = taps(5, size[0], y)
        for x in range(size[1]):
            x0, x1, a = taps(6, size[1], x)
            top = (1 - a) * patch[y0, x0] + a * patch[y0, x1]
            bottom = (1 - a) * patch[y1, x0] + a * patch[y1, x1]
            v = (1 - b) * top + b * bottom  # (C,)
            ranked = v.sort(descending=True).values
            assert values[y, x].item() == pytest.approx(ranked[0].item(), abs=1e-6)
            if ranked[0] - ranked[1] > 1e-6:
                assert labels[y, x].item() == v.argmax().item()


def test_upsample_argmax_non_finite_inputs_follow_torch():
    """NaN and inf take torch's own path (the oracle), so they behave as before."""
    patch = torch.rand(20, 20, 5, generator=torch.Generator().manual_seed(7))
    patch[3, 4, 2] = float("nan")
    patch[10, 11, 1] = float("inf")
    want, got = _oracle(patch, (200, 150)), upsample_argmax(patch, (200, 150))
    assert torch.equal(got[1], want[1])
    torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=0)


def test_upsample_argmax_falls_back_when_the_check_fails(monkeypatch):
    """If the one-off check finds this build's arithmetic differs, the oracle runs."""
    import hbird.decode as decode

    monkeypatch.setitem(decode._CHECKED, "ok", False)
    monkeypatch.setattr(decode, "_tiled_max", lambda *a: pytest.fail("tiled path used"))
    patch = torch.rand(32, 32, 21, generator=torch.Generator().manual_seed(8))
    want, got = _oracle(patch, (512, 512)), upsample_argmax(patch, (512, 512))
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_decode_dense_classification_is_the_oracle():
    patch = torch.softmax(torch.randn(32, 32, 21, generator=torch.Generator().manual_seed(9)), -1)
    pred = decode_dense(patch, (512, 480), classification=True)
    want = _oracle(patch, (512, 480))
    assert torch.equal(pred.labels, want[1]) and torch.equal(pred.confidence, want[0])


def test_upsample_argmax_other_layouts_and_dtypes_match():
    """Transposed (not channels-last once permuted) and float64 soft labels: the same
    values and labels as the oracle."""
    gen = torch.Generator().manual_seed(11)
    transposed = torch.rand(24, 20, 21, generator=gen).transpose(0, 1)  # (20, 24, 21)
    double = torch.rand(20, 24, 21, generator=gen, dtype=torch.float64)
    for patch in (transposed, double):
        want, got = _oracle(patch, (320, 384)), upsample_argmax(patch, (320, 384))
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])


def test_tiles_stay_off_for_tensors_off_the_cpu() -> None:
    """The reproduced arithmetic is the CPU kernel's: other devices take the oracle path."""
    x = _channels_first(torch.zeros(4, 4, 21))
    assert _torch_kernel(x, (32, 32)) == "channels_last"
    on_meta = x.to("meta")
    assert on_meta.is_contiguous(memory_format=torch.channels_last)  # only the device differs
    assert _torch_kernel(on_meta, (32, 32)) is None
