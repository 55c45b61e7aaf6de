"""The timm backend, the test encoders and name resolution."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from hbird.encoders import (
    Encoder,
    UnknownEncoderError,
    create_encoder,
    list_encoders,
)
from hbird.errors import InputError


@pytest.fixture(scope="module")
def vit() -> Encoder:
    return create_encoder("test_vit")


@pytest.fixture(scope="module")
def vit_reg() -> Encoder:
    return create_encoder("test_vit_reg")


def block_outputs(
    model: torch.nn.Module, x: torch.Tensor
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Oracle: every block's output tokens (B, T, D) via hooks, and forward_features(x)."""
    outputs: list[torch.Tensor] = []
    hooks = [blk.register_forward_hook(lambda m, i, o: outputs.append(o)) for blk in model.blocks]
    try:
        with torch.no_grad():
            final = model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs, final


def as_grid(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.reshape(tokens.shape[0], h, w, -1)


@pytest.mark.parametrize(
    "name,size",
    [
        ("test_vit", (40, 56)),
        ("test_vit", (8, 24)),
        ("test_vit", (72, 8)),
        ("test_vit_reg", (24, 40)),
        ("test_vit_p16", (48, 80)),
    ],
)
def test_shapes_for_any_multiple_of_the_patch(name: str, size: tuple[int, int]) -> None:
    enc = create_encoder(name)
    x = torch.rand(2, 3, *size)
    with torch.no_grad():
        out = enc(enc.normalize(x))
    p = enc.patch_size
    assert out.shape == (2, size[0] // p, size[1] // p, 32)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_size_not_a_multiple_of_the_patch_is_refused(vit: Encoder) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 8"):
        vit(torch.rand(1, 3, 30, 32))


@pytest.mark.parametrize("fixture,prefix", [("vit", 1), ("vit_reg", 5)])
def test_prefix_and_register_tokens_are_dropped(request, fixture: str, prefix: int) -> None:
    enc = request.getfixturevalue(fixture)
    assert enc.num_prefix_tokens == prefix == enc.model.num_prefix_tokens
    x = torch.randn(2, 3, 40, 56)
    blocks, final = block_outputs(enc.model, x)
    assert final.shape[1] == prefix + 5 * 7
    with torch.no_grad():
        torch.testing.assert_close(enc(x), as_grid(final[:, prefix:], 5, 7), rtol=0, atol=0)
        # intermediate blocks come out without the final norm
        torch.testing.assert_close(
            enc(x, layers=0), as_grid(blocks[0][:, prefix:], 5, 7), rtol=0, atol=0
        )


def test_layer_selection(vit: Encoder) -> None:
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        first, last = vit(x, layers=0), vit(x, layers=1)
        assert not torch.equal(first, last)
        torch.testing.assert_close(vit(x), last, rtol=0, atol=0)
        torch.testing.assert_close(vit(x, layers=-1), last, rtol=0, atol=0)
        torch.testing.assert_close(vit(x, layers=-2), first, rtol=0, atol=0)
        both = vit(x, layers=[1, 0])
    assert both.shape == (1, 4, 6, 64) and vit.feature_dim([1, 0]) == 64
    torch.testing.assert_close(both, torch.cat([last, first], dim=-1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="layer 2 is out of range"):
        vit(x, layers=2)


def test_created_frozen_and_in_eval_mode(vit: Encoder) -> None:
    assert not vit.training and not vit.model.training
    assert all(not p.requires_grad for p in vit.parameters())
    assert (vit.patch_size, vit.embed_dim, vit.num_blocks) == (8, 32, 2)


def test_test_encoders_are_deterministic_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = create_encoder("test_vit").state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(456)
    b = create_encoder("test_vit").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    c = create_encoder("test_vit", seed=1).state_dict()
    assert not torch.equal(a["model.blocks.0.attn.qkv.weight"], c["model.blocks.0.attn.qkv.weight"])


def test_identity_tells_seeds_apart() -> None:
    ids = [create_encoder("test_vit", seed=s).identity() for s in (0, 0, 1, 2)]
    assert ids[0] == ids[1]
    assert len({i["weights_hash"] for i in ids[1:]}) == 3
    assert len({i["config_hash"] for i in ids}) == 1
    assert create_encoder("test_vit_reg").identity()["config_hash"] != ids[0]["config_hash"]


def test_weights_from_safetensors_and_pth(tmp_path) -> None:
    source = create_encoder("test_vit", seed=7)
    state = source.model.state_dict()
    save_file(state, tmp_path / "w.safetensors")
    # a training checkpoint: container key and DistributedDataParallel prefix
    torch.save(
        {"model": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pth"
    )
    x = torch.randn(1, 3, 24, 32)
    with torch.no_grad():
        expected = source(x, layers=[0, 1])
        for file in ("w.safetensors", "w.pth"):
            enc = create_encoder("test_vit", weights=tmp_path / file)
            assert enc.weights_source == str((tmp_path / file).resolve())
            torch.testing.assert_close(enc(x, layers=[0, 1]), expected, rtol=0, atol=0)


def test_head_keys_in_the_file_are_ignored(tmp_path) -> None:
    state = dict(create_encoder("test_vit", seed=2).model.state_dict())
    state["head.weight"], state["head.bias"] = torch.zeros(10, 32), torch.zeros(10)
    torch.save(state, tmp_path / "with_head.pt")
    enc = create_encoder("test_vit", weights=tmp_path / "with_head.pt")
    assert torch.equal(enc.model.norm.weight, state["norm.weight"])


def test_bad_weights_files_name_the_file(tmp_path) -> None:
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    (tmp_path / "w.npz").write_bytes(b"")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {
        "missing.pth": "does not exist",
        "junk.safetensors": "could not be read as safetensors",
        "junk.pth": "could not be read with torch.load",
        "w.npz": "unsupported extension",
        "list.pt": "holds a list",
    }
    for file, message in cases.items():
        with pytest.raises(InputError, match=message) as info:
            create_encoder("test_vit", weights=tmp_path / file)
        assert str(tmp_path / file) in str(info.value)


def test_weights_for_another_architecture_are_refused_clearly(tmp_path) -> None:
    save_file(create_encoder("test_vit_p16").model.state_dict(), tmp_path / "p16.safetensors")
    with pytest.raises(
        InputError, match=r"does not fit test_vit: shape mismatches.*patch_embed\.proj\.weight"
    ):
        create_encoder("test_vit", weights=tmp_path / "p16.safetensors")
    state = dict(create_encoder("test_vit").model.state_dict())
    del state["norm.weight"]
    state["blocks.9.extra"] = torch.zeros(1)
    save_file(state, tmp_path / "broken.safetensors")
    with pytest.raises(
        InputError, match=r"missing keys: norm\.weight; unexpected keys: blocks\.9\.extra"
    ):
        create_encoder("test_vit", weights=tmp_path / "broken.safetensors")


def test_timm_names_go_to_timm() -> None:
    enc = create_encoder("vit_tiny_patch16_224.augreg_in21k", depth=2)
    assert type(enc).__name__ == "TimmEncoder" and enc.name == "vit_tiny_patch16_224.augreg_in21k"
    assert (enc.patch_size, enc.embed_dim, enc.num_blocks) == (16, 192, 2)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.weights_source == "random:seed=0"
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 48, 80)).shape == (1, 3, 5, 192)


def test_unknown_and_unsupported_names() -> None:
    with pytest.raises(UnknownEncoderError, match=r"hbird encoders.*") as info:
        create_encoder("vit_smal_patch14_dinov2")
    assert "vit_small_patch14_dinov2.lvd142m" in str(info.value)  # a suggestion
    with pytest.raises(ValueError, match="ViT-family"):
        create_encoder("resnet18")
    # test encoders ignore pretrained=True: their seeded weights are all they have
    same = create_encoder("test_vit", pretrained=True).identity()
    assert same == create_encoder("test_vit").identity()
    with pytest.raises(ValueError, match="not both"):
        create_encoder("vit_tiny_patch16_224", weights="x.pth", pretrained=True)


def test_list_encoders() -> None:
    names = list_encoders()
    assert {"test_vit", "test_vit_reg", "test_vit_p16"} <= set(names)
    assert "vit_small_patch14_dinov2.lvd142m" in names and "vit_small_patch16_224.dino" in names
    assert "hf:" not in names
    dinov2 = list_encoders("*dinov2*")
    assert "vit_base_patch14_reg4_dinov2.lvd142m" in dinov2 and all("dinov2" in n for n in dinov2)
    assert list_encoders("test_*", include_timm=False) == [
        "test_axial",
        "test_elastic",
        "test_vit",
        "test_vit_p16",
        "test_vit_reg",
    ]


def test_random_timm_weights_are_fixed_by_seed_and_leave_the_global_rng_alone():
    """A random timm model built by name is the same in every process (so a bank built on
    it loads again by name); the seed picks the draw; torch's global RNG is untouched."""
    name, options = "vit_tiny_patch16_224", dict(depth=2, img_size=32)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = create_encoder(name, pretrained=False, **options)
    assert torch.equal(torch.rand(3), expected_next)
    b = create_encoder(name, pretrained=False, **options)
    other = create_encoder(name, pretrained=False, seed=1, **options)
    assert a.identity()["weights_hash"] == b.identity()["weights_hash"]
    assert a.identity()["weights_hash"] != other.identity()["weights_hash"]
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(a.forward_patches(x), b.forward_patches(x))
    assert not torch.equal(a.forward_patches(x), other.forward_patches(x))
