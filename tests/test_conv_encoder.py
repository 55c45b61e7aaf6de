"""Feature-map backbones behind the Encoder contract (hbird.encoders.conv_backbone)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hbird.encoders import create_encoder
from hbird.encoders.conv_backbone import StagedEncoder
from hbird.encoders.hub import WeightsUnavailableError
from hbird.errors import InputError
from hbird.features import FEATURE_EXTRACTORS


class PoolingStages(nn.Module):
    """Stage i = the input's first channel, average-pooled by 4, 8 and 16, times (i + 1),
    repeated on i + 1 channels: outputs any test can write down by hand."""

    stage_channels = (1, 2, 3)
    stage_strides = (4, 8, 16)

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward_stages(self, x, stages):
        return [
            (i + 1) * self.scale * F.avg_pool2d(x[:, :1], s).expand(-1, i + 1, -1, -1)
            for i, s in zip(stages, (self.stage_strides[i] for i in stages))
        ]


def test_stages_are_concatenated_on_the_last_stage_grid():
    """Stage 0 (stride 4) pooled 4×4 to the stride-16 grid equals pooling the input 16×16."""
    encoder = StagedEncoder(PoolingStages(), "pooling")
    assert (encoder.patch_size, encoder.embed_dim, encoder.num_blocks) == (16, 3, 3)
    x = torch.rand(2, 3, 32, 48)
    feats = encoder(x, layers=[0, -1, 1])
    by_hand = F.avg_pool2d(x[:, :1], 16).permute(0, 2, 3, 1)  # (2, 2, 3, 1)
    assert feats.shape == (2, 2, 3, 1 + 3 + 2) and encoder.feature_dim([0, -1, 1]) == 6
    assert torch.allclose(feats[..., :1], by_hand, atol=1e-6)
    assert torch.allclose(feats[..., 1:4], 3 * by_hand.expand(-1, -1, -1, 3), atol=1e-6)
    assert torch.allclose(feats[..., 4:], 2 * by_hand.expand(-1, -1, -1, 2), atol=1e-6)


def test_a_module_without_stages_is_refused_by_name():
    with pytest.raises(ValueError, match="stage_channels, stage_strides and forward_stages"):
        StagedEncoder(nn.Linear(2, 2), "plain")


def test_no_published_weights_says_what_to_do():
    with pytest.raises(WeightsUnavailableError, match="--weights FILE.*--no-pretrained"):
        create_encoder("axial_resnet_s", pretrained=True)


def test_weights_of_another_width_are_refused_naming_the_keys(tmp_path):
    other = create_encoder("axial_deeplab_s", depths=(1, 1, 1, 1), width=1 / 8)
    path = tmp_path / "w.pth"
    torch.save(other.model.state_dict(), path)
    with pytest.raises(InputError, match="does not fit test_axial.*shape mismatches"):
        create_encoder("test_axial", weights=path)


def test_fungi_differentiates_the_last_blocks_projection():
    """Dense FUNGI runs unchanged: its default gradient layer is the backbone's named
    ``nn.Linear`` over the last stage's tokens, and the gradient half carries information."""
    encoder = create_encoder("test_axial")
    assert encoder.gradient_layer == "stages.3.0.conv_up"
    fungi = FEATURE_EXTRACTORS.create("fungi", encoder)
    gen = torch.Generator().manual_seed(0)
    views = [torch.rand(3, 32, 48, generator=gen) for _ in range(3)]
    feats = fungi.fit(views[:2]).transform(views)
    d = encoder.embed_dim
    assert feats[0].shape == (2, 3, 2 * d) and fungi.feature_dim == 2 * d
    grads = torch.stack([f[..., d:] for f in feats])  # the projected gradients, scaled
    assert torch.isfinite(grads).all() and grads.abs().sum() > 0
    assert not torch.allclose(grads[0], grads[2])
