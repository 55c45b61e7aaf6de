"""The compiled encoder path (``compile=True``) against the uncompiled model as oracle.

Compiling takes tens of seconds, so the tests that compile are ``slow``; the bookkeeping
(padding a short batch, recompiling after a weight change, identity, preset) is not.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hbird.encoders import compiled, create_encoder, encode_batches
from hbird.eval.config import resolve_config
from hbird.features import create_extractor


@pytest.fixture()
def vit():
    return create_encoder("test_vit_reg")


def test_short_batch_takes_the_smallest_compiled_size_that_holds_it(vit) -> None:
    assert compiled.padded_size(vit, 3, 40, 56, most=16) == 3  # nothing compiled yet
    compiled._entry(vit).shapes.update({(8, 40, 56), (4, 40, 56), (16, 32, 32)})
    assert compiled.padded_size(vit, 3, 40, 56, most=16) == 4
    assert compiled.padded_size(vit, 5, 40, 56, most=16) == 8
    assert compiled.padded_size(vit, 5, 40, 56, most=6) == 5  # never past the batch size
    assert compiled.padded_size(vit, 9, 40, 56, most=16) == 9
    assert compiled.padded_size(vit, 2, 32, 32, most=16) == 16


def test_a_changed_weight_gets_a_new_compiled_function(vit) -> None:
    first = compiled._entry(vit)
    assert compiled._entry(vit) is first
    with torch.no_grad():
        vit.model.blocks[0].mlp.fc1.weight.mul_(2.0)
    assert compiled._entry(vit) is not first


def test_patch_features_record_compile_only_when_on(vit) -> None:
    plain = create_extractor("patch", vit, autocast="bf16")
    fast = create_extractor("patch", vit, autocast="bf16", compile=True)
    assert plain.identity() == {"name": "patch", "layers": None, "autocast": "bf16"}
    assert fast.identity() == {**plain.identity(), "compile": True}


def test_compile_preset_is_the_bf16_preset_with_a_compiled_encoder() -> None:
    bf16, fast = resolve_config("hummingbird_bf16"), resolve_config("hummingbird_bf16_compile")
    assert fast.feature_options == {"compile": True}
    assert dataclasses.replace(fast, feature_options=None) == bf16


@pytest.mark.slow
@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_compiled_features_match_the_uncompiled_model(vit, autocast) -> None:
    """3 images at batch 2: one compile (batch 2); the last image runs padded to 2."""
    torch.manual_seed(0)
    images = [torch.rand(3, 40, 56) for _ in range(3)]
    eager = encode_batches(vit, images, layers=[0, -1], batch_size=2, autocast=autocast)
    fast = encode_batches(
        vit, images, layers=[0, -1], batch_size=2, autocast=autocast, compile=True
    )
    assert compiled._entry(vit).shapes == {(2, 40, 56)}
    tolerance = 1e-5 if autocast is None else 5e-2  # bf16: fused kernels round elsewhere
    for f, e in zip(fast, eager):
        assert f.shape == e.shape and f.dtype == torch.float32
        torch.testing.assert_close(f, e, rtol=tolerance, atol=tolerance)
