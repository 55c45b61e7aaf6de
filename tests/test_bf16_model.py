"""The whole encoder in bf16 (``bf16_model=True``) against float32 as the oracle.

bf16 keeps 8 significand bits (a relative rounding error of 2⁻⁹ per operation), and here
the residual stream and every LayerNorm output are rounded too, so features are bounded
against the float32 model's, not equal to them. The attention's split of the prefix keys
is checked against softmax(QKᵀ/√d)V computed directly in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hbird.cli import main
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.encoders import bf16_model, compiled, create_encoder, encode_batches
from hbird.encoders.prepack import prepack_supported
from hbird.errors import InputError
from hbird.features import create_extractor
from hbird.features.cache import CachedFeatures


@pytest.fixture(scope="module")
def vit():
    return create_encoder("test_vit_reg")  # a class token and 4 registers: 5 prefix keys


def attention_float64(q, k, v) -> torch.Tensor:
    """softmax(QKᵀ/√d)V (Vaswani et al. 2017, eq. 1), in float64."""
    q, k, v = q.double(), k.double(), v.double()
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1) @ v


@pytest.mark.parametrize("keys", [17, 21, 37, 785, 1025])  # 1, 5, 5, 1, 1 keys split off
def test_split_attention_is_softmax_attention(keys) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, keys, 16).mul(2).bfloat16() for _ in range(3))
    exact = attention_float64(q, k, v)
    got = bf16_model.split_prefix_keys(q, k, v)
    plain = F.scaled_dot_product_attention(q, k, v)  # torch's own bf16 attention
    assert got.dtype == torch.bfloat16 and got.shape == exact.shape
    # as close as torch's bf16 kernel, up to two bf16 roundings of the merge (2^-9 each)
    bound = (plain.double() - exact).abs().max() + 2 * 2**-9 * exact.abs().max()
    assert (got.double() - exact).abs().max() <= bound


def test_the_split_key_weights_add_up_to_one() -> None:
    """Values all equal to 1 → every output is 1: the two parts' weights sum to 1."""
    torch.manual_seed(0)
    q, k = (torch.randn(1, 2, 21, 8).mul(3).bfloat16() for _ in range(2))
    got = bf16_model.split_prefix_keys(q, k, torch.ones(1, 2, 21, 8, dtype=torch.bfloat16))
    torch.testing.assert_close(got.float(), torch.ones(1, 2, 21, 8), atol=2**-7, rtol=0)


@pytest.mark.parametrize(
    ("keys", "dtype", "options"),
    [
        (32, torch.bfloat16, {}),  # a multiple of 16: nothing to split
        (1025, torch.bfloat16, {}),  # a last block of 1 key: splitting would not pay
        (577, torch.bfloat16, {}),  # a last block of 65 keys
        (21, torch.float32, {}),  # only bf16 is split
        (21, torch.bfloat16, {"is_causal": True}),
        (21, torch.bfloat16, {"scale": 0.5}),
    ],
)
def test_other_attention_calls_are_left_to_torch(keys, dtype, options) -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, keys, 8, dtype=dtype) for _ in range(3))
    expected = F.scaled_dot_product_attention(q, k, v, **options)
    with torch.inference_mode(), bf16_model.split_attention():
        got = F.scaled_dot_product_attention(q, k, v, **options)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("name", ["test_vit", "test_vit_reg"])
def test_features_agree_with_float32(name, monkeypatch) -> None:
    """Max abs difference ≤ 3% of the largest feature, cosine ≥ 0.9995 per patch; the
    attention split at 128×136 (16·17 patches + 1 or 5 prefix tokens: a last flash block
    of 273 or 277 keys), not at 40×56 (36-40 tokens)."""
    encoder = create_encoder(name)
    splits = []
    split = bf16_model.split_prefix_keys
    monkeypatch.setattr(bf16_model, "split_prefix_keys", lambda *a: splits.append(1) or split(*a))
    torch.manual_seed(0)
    images = [torch.rand(3, *s) for s in [(40, 56)] * 2 + [(128, 136)] * 3]
    reference = encode_batches(encoder, images, [0, -1], batch_size=2)
    got = encode_batches(encoder, images, [0, -1], batch_size=2, autocast="bf16", bf16_model=True)
    assert len(splits) == 2 * encoder.num_blocks  # 2 batches at 128×136: 2 + 1 images
    for g, r in zip(got, reference):
        assert g.dtype == torch.float32 and g.shape == r.shape
        assert (g - r).abs().max() <= 0.03 * r.abs().max()
        assert F.cosine_similarity(g.flatten(0, 1), r.flatten(0, 1), dim=-1).min() >= 0.9995
    assert next(encoder.parameters()).dtype == torch.float32  # the encoder is untouched


def test_the_bf16_copy_is_kept_and_follows_the_weights(vit) -> None:
    copy = bf16_model.bf16_copy(vit)
    assert bf16_model.bf16_copy(vit) is copy
    assert all(p.dtype == torch.bfloat16 for p in copy.parameters())
    weight = vit.model.blocks[0].mlp.fc1.weight
    with torch.no_grad():
        weight.mul_(2.0)
    fresh = bf16_model.bf16_copy(vit)
    assert fresh is not copy
    assert torch.equal(fresh.model.blocks[0].mlp.fc1.weight, weight.bfloat16())


@pytest.mark.skipif(not prepack_supported(), reason="no oneDNN bf16 kernels here")
def test_prepacked_linears_of_the_copy_change_no_bit(vit) -> None:
    """The bf16 copy's linears run prepacked; plain bf16 ``nn.Linear`` is the oracle."""
    torch.manual_seed(0)
    images = [torch.rand(3, 40, 56) for _ in range(2)]
    fast = encode_batches(vit, images, autocast="bf16", bf16_model=True)
    plain = encode_batches(vit, images, autocast="bf16", bf16_model=True, prepack=False)
    assert all(torch.equal(f, p) for f, p in zip(fast, plain))


def test_identity_and_cache_key_differ_from_autocast(vit, tmp_path) -> None:
    autocast = create_extractor("patch", vit, autocast="bf16")
    whole = create_extractor("patch", vit, autocast="bf16", bf16_model=True)
    assert whole.identity() == {**autocast.identity(), "bf16_model": True}
    assert "bf16_model" not in autocast.identity()  # autocast=bf16's banks keep their identity
    contexts = {CachedFeatures(e, tmp_path).context() for e in (autocast, whole)}
    assert len(contexts) == 2


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"bf16_model": True}, ["bf16_model=true", "autocast=bf16", "--autocast bf16"]),
        ({"bf16_model": True, "autocast": "fp16"}, ["autocast=bf16", "'fp16'"]),
        ({"bf16_model": True, "autocast": "bf16", "compile": True}, ["compile=true"]),
        ({"bf16_model": "yes", "autocast": "bf16"}, ["true or false", "'yes'"]),
    ],
)
def test_bad_settings_are_refused_with_the_fix(vit, options, words) -> None:
    with pytest.raises(InputError) as err:
        create_extractor("patch", vit, **options)
    assert all(word in str(err.value) for word in words), str(err.value)


def test_encode_batches_refuses_bf16_model_without_bf16_autocast(vit) -> None:
    with pytest.raises(ValueError, match="autocast='bf16'"):
        encode_batches(vit, [torch.rand(3, 16, 16)], bf16_model=True)


def test_cli_names_the_missing_autocast(tmp_path, capsys) -> None:
    scenes = make_scenes(4, seed=3, num_classes=2, size=(32, 32))
    write_scene_folder(tmp_path / "prompt", scenes[:3])
    write_scene_folder(tmp_path / "query", scenes[3:], prefix="q")
    argv = ["predict", "--prompt", str(tmp_path / "prompt"), "--query",
            str(tmp_path / "query" / "images"), "--out", str(tmp_path / "out"),
            "--task", "segmentation", "--encoder", "test_vit", "--image-size", "32",
            "--quiet", "--feature-option", "bf16_model=true"]  # fmt: skip
    assert main(argv) == 2
    text = capsys.readouterr().err
    assert "bf16_model=true" in text and "--autocast bf16" in text and "Traceback" not in text
    assert not (tmp_path / "out").exists()


def test_a_compiled_entry_is_not_copied(vit) -> None:
    """The bf16 copy leaves out what is cached on the encoder (a compiled forward)."""
    entry = compiled._entry(vit)  # builds the torch.compile wrapper, compiles nothing yet
    vars(vit).pop("_bf16_copy", None)
    copy = bf16_model.bf16_copy(vit)
    assert vars(copy).get("_compiled") is None and vars(vit)["_compiled"] is entry
