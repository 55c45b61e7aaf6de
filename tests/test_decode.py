"""Eq. 1 of Balazevic et al. (2023, §3.1) and upsampling, pinned to hand-computed values."""

import math

import pytest
import torch

from hbird.decode import (
    aggregate,
    decode_dense,
    neighbour_attention,
    softmax_over_neighbours,
    upsample,
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
