"""Batched feature extraction equals one forward pass per image."""

from __future__ import annotations

import pytest
import torch

from hbird.encoders import create_encoder, encode_batches
from hbird.encoders.inference import runs_of_equal_size


@pytest.fixture(scope="module")
def vit():
    return create_encoder("test_vit_reg")


SIZES = [(40, 56), (40, 56), (40, 56), (32, 32), (40, 56), (16, 72)]


def per_image(enc, image: torch.Tensor, layers=None) -> torch.Tensor:
    with torch.no_grad():
        return enc.forward_patches(enc.normalize(image[None]), layers)[0]


def test_runs_group_consecutive_equal_sizes() -> None:
    images = [torch.zeros(3, *s) for s in SIZES]
    assert list(runs_of_equal_size(images, batch_size=2)) == [[0, 1], [2], [3], [4], [5]]
    assert list(runs_of_equal_size(images, batch_size=16)) == [[0, 1, 2], [3], [4], [5]]


@pytest.mark.parametrize("layers", [None, [0, -1]])
def test_matches_per_image_forward(vit, layers) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, *s) for s in SIZES]
    feats = encode_batches(vit, images, layers=layers, batch_size=2)
    assert len(feats) == len(images)
    for image, f in zip(images, feats):
        expected = per_image(vit, image, layers)
        assert f.shape == (image.shape[1] // 8, image.shape[2] // 8, vit.feature_dim(layers))
        assert f.dtype == torch.float32 and f.device.type == "cpu" and not f.is_inference()
        torch.testing.assert_close(f, expected, rtol=1e-5, atol=1e-5)
    feats[0] += 1  # ordinary tensors: in-place edits work and do not touch their neighbours
    torch.testing.assert_close(feats[1], per_image(vit, images[1], layers), rtol=1e-5, atol=1e-5)


def test_progress_bar_and_input_checks(vit, capsys) -> None:
    encode_batches(vit, [torch.rand(3, 16, 16)] * 3, progress="encoding prompt")
    assert "encoding prompt" in capsys.readouterr().err
    with pytest.raises(ValueError, match="image 1 has dtype torch.uint8"):
        encode_batches(vit, [torch.rand(3, 16, 16), torch.zeros(3, 16, 16, dtype=torch.uint8)])
    with pytest.raises(ValueError, match=r"image 0 must be a \(3, H, W\) tensor, got \(16, 16\)"):
        encode_batches(vit, [torch.rand(16, 16)])
    with pytest.raises(ValueError, match="batch_size"):
        encode_batches(vit, [torch.rand(3, 16, 16)], batch_size=0)
    assert encode_batches(vit, []) == []


def test_autocast_runs_the_forward_in_reduced_precision(vit) -> None:
    torch.manual_seed(0)
    images = [torch.rand(3, 40, 56) for _ in range(3)]
    full = encode_batches(vit, images)
    half = encode_batches(vit, images, autocast="bf16")
    # oracle: the same forward under torch.autocast by hand
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        manual = vit.forward_patches(vit.normalize(torch.stack(images)))
    for f, h, m in zip(full, half, manual):
        assert h.dtype == torch.float32 and h.shape == f.shape
        torch.testing.assert_close(h, m.float())
        assert not torch.equal(h, f)  # bf16 really ran
        cosine = torch.nn.functional.cosine_similarity(h, f, dim=-1)
        assert float(cosine.min()) > 0.98
    with pytest.raises(ValueError, match="autocast"):
        encode_batches(vit, images, autocast="int8")
