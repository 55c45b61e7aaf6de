"""The CLIP backends behind one protocol, MaskCLIP and the 85 templates (issue 11,
"CLIP backends", steps 1 and 5). No test downloads: open_clip models are built from a
tiny custom config, Hugging Face ones from a tiny saved folder."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hbird.errors import InputError
from hbird.zeroshot.clip import CLIPS, clip_resize_crop, create_clip
from hbird.zeroshot.clip.maskclip import attention_pool_dense
from hbird.zeroshot.templates import (
    CLIP_IMAGENET_TEMPLATES,
    RECO_TEMPLATES,
    SCENE_TEMPLATES,
    prompt_name,
    text_embeddings,
)


def _unit_rows(x):
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[:-1]), atol=1e-5)


def test_test_clip_protocol_shapes_norms_and_seed():
    clip = create_clip("test_clip")
    images = torch.rand(2, 3, 32, 32)
    x = clip.normalize(images)
    assert clip.encode_image(x).shape == (2, clip.embed_dim) and _unit_rows(clip.encode_image(x))
    assert clip.encode_text(["a", "bc"]).shape == (2, clip.embed_dim)
    dense = clip.encode_dense(x)
    assert dense.shape == (2, 4, 4, clip.embed_dim) and _unit_rows(dense)
    # the toy dense path projects every patch; the image embedding projects their mean
    torch.testing.assert_close(
        F.normalize(clip._encode_dense(x).mean(dim=(1, 2)), dim=-1), clip.encode_image(x)
    )
    other = create_clip("test_clip", seed=1)
    assert clip.identity() == create_clip("test_clip").identity()
    assert clip.identity()["weights_hash"] != other.identity()["weights_hash"]
    assert "test_clip" in CLIPS


def test_test_clip_weights_file_round_trip(tmp_path):
    from safetensors.torch import save_file

    file = tmp_path / "clip.safetensors"
    save_file(create_clip("test_clip", seed=3).state_dict(), str(file))
    loaded = create_clip("test_clip", weights=file)
    assert (
        loaded.identity()["weights_hash"]
        == create_clip("test_clip", seed=3).identity()["weights_hash"]
    )


def test_clip_resize_crop_is_short_side_then_centre_crop():
    """A 4×8 image at size 4 needs no resize: the crop is columns 2..5. A 2×4 image at size
    4 is resized to 4×8 first. Values stay in [0, 1] (bicubic overshoot clamped)."""
    image = torch.arange(32, dtype=torch.float32).view(1, 4, 8).expand(3, 4, 8) / 31
    torch.testing.assert_close(clip_resize_crop(image, 4), image[:, :, 2:6])
    small = torch.rand(3, 2, 4)
    out = clip_resize_crop(small, 4)
    assert out.shape == (3, 4, 4) and out.min() >= 0 and out.max() <= 1
    tall = clip_resize_crop(torch.rand(3, 9, 3), 3)
    assert tall.shape == (3, 3, 3)
    clip = create_clip("test_clip")
    expected = (clip_resize_crop(image, 32) - torch.tensor(clip.mean).view(3, 1, 1)) / torch.tensor(
        clip.std
    ).view(3, 1, 1)
    torch.testing.assert_close(clip.preprocess(image), expected)


def test_templates_are_the_80_clip_ones_plus_the_5_scene_ones():
    assert len(CLIP_IMAGENET_TEMPLATES) == 80 and len(set(CLIP_IMAGENET_TEMPLATES)) == 80
    assert RECO_TEMPLATES[:80] == CLIP_IMAGENET_TEMPLATES and len(RECO_TEMPLATES) == 85
    assert SCENE_TEMPLATES == (
        "there is a {} in the scene.",
        "there is the {} in the scene.",
        "this is a {} in the scene.",
        "this is the {} in the scene.",
        "this is one {} in the scene.",
    )
    assert all(t.count("{}") == 1 for t in RECO_TEMPLATES)
    assert (
        CLIP_IMAGENET_TEMPLATES[0] == "a bad photo of a {}." and "itap of my {}." in RECO_TEMPLATES
    )


class _LengthClip:
    """A stand-in whose text embedding of a prompt is (len, 1) unnormalised, so t_c can be
    computed by hand."""

    embed_dim = 2

    def encode_text(self, prompts):
        return torch.tensor([[float(len(p)), 1.0] for p in prompts])


def test_text_embedding_is_the_normalised_mean_of_normalised_prompt_embeddings():
    """Step 1 by hand: t = normalize(mean_t normalize((len(prompt_t), 1)))."""
    templates = ("{}", "a {} b")
    t = text_embeddings(_LengthClip(), ["car"], templates)[0]
    rows = torch.tensor([[3.0, 1.0], [7.0, 1.0]])
    mean = (rows / rows.norm(dim=1, keepdim=True)).mean(0)
    torch.testing.assert_close(t, mean / mean.norm())
    assert text_embeddings(_LengthClip(), [], templates).shape == (0, 2)
    assert prompt_name("parking", {"parking": "parking lot"}) == "parking lot"
    assert prompt_name("road", {"parking": "parking lot"}) == "road"


# -- MaskCLIP on open_clip's ModifiedResNet ------------------------------------------


def _tiny_resnet():
    pytest.importorskip("open_clip")
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(0)
    return ModifiedResNet(
        layers=[1, 1, 1, 1], output_dim=16, heads=4, image_size=64, width=8
    ).eval()


def test_attention_pool_dense_is_value_then_output_projection():
    visual = _tiny_resnet()
    pool = visual.attnpool
    feats = torch.randn(2, 256, 3, 2)
    got = attention_pool_dense(pool, feats)
    x = feats[0, :, 1, 0]
    expected = pool.c_proj.weight @ (pool.v_proj.weight @ x + pool.v_proj.bias) + pool.c_proj.bias
    torch.testing.assert_close(got[0, 1, 0], expected)


def test_maskclip_equals_the_attention_pool_on_a_constant_map_without_positions():
    """With the positional embedding zeroed and all locations equal, every token of the
    attention pool is the same vector, so the pool's output is c_proj(v_proj(x))
    whatever query·key gives: MaskCLIP at each location must equal it."""
    visual = _tiny_resnet()
    with torch.no_grad():
        visual.attnpool.positional_embedding.zero_()
        feats = torch.randn(1, 256, 1, 1).expand(1, 256, 2, 2).contiguous()
        pooled = visual.attnpool(feats)
        dense = attention_pool_dense(visual.attnpool, feats)
    for y in range(2):
        for x in range(2):
            torch.testing.assert_close(dense[0, y, x], pooled[0], atol=1e-5, rtol=1e-5)


TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_open_clip_name(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / "hbird-tiny-RN.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder / "hbird-tiny-RN.json")
    return "hbird-tiny-RN"


def test_open_clip_tiny_resnet_protocol_and_dense(tiny_open_clip_name, tmp_path):
    clip = create_clip(tiny_open_clip_name, pretrained=False)
    assert clip.has_dense and clip.image_size == 64 and clip.embed_dim == 16
    x = clip.normalize(torch.rand(2, 3, 64, 64))
    assert clip.encode_image(x).shape == (2, 16)
    text = clip.encode_text(["a photo of a car.", "sky"])
    assert text.shape == (2, 16) and _unit_rows(text)
    dense = clip.encode_dense(clip.normalize(torch.rand(1, 3, 64, 96)))
    assert dense.shape == (1, 2, 3, 16) and _unit_rows(dense)
    # weights from a local file give the same model
    file = tmp_path / "tiny.pt"
    torch.save(clip.model.state_dict(), file)
    again = create_clip(tiny_open_clip_name, weights=file)
    assert again.identity()["weights_hash"] == clip.identity()["weights_hash"]
    torch.testing.assert_close(again.encode_text(["sky"]), text[1:])


def test_open_clip_errors(tiny_open_clip_name, tmp_path):
    with pytest.raises(InputError, match="unknown open_clip model"):
        create_clip("no-such-clip-model")
    with pytest.raises(InputError, match="does not exist"):
        create_clip(tiny_open_clip_name, weights=tmp_path / "missing.pt")
    with pytest.raises(InputError, match="published tags"):
        create_clip(tiny_open_clip_name, weights="not-a-tag")
    with pytest.raises(InputError, match="open_clip_config.json"):
        create_clip(tiny_open_clip_name, weights=tmp_path)


@pytest.mark.slow
def test_open_clip_published_weights_offline_fail_fast(monkeypatch):
    """Missing CLIP weights offline: a clear error naming --clip-weights (builds RN50)."""
    pytest.importorskip("open_clip")
    from hbird.zeroshot.clip.open_clip_backend import ClipWeightsError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ClipWeightsError, match="--clip-weights"):
        create_clip("RN50", weights="openai")


def test_vit_clip_has_no_dense_path():
    clip = create_clip("test_clip")
    clip.has_dense = False
    from hbird.zeroshot.clip.base import ClipModel

    with pytest.raises(InputError, match="dense"):
        ClipModel._encode_dense(clip, torch.zeros(1, 3, 32, 32))


# -- Hugging Face CLIPModel ------------------------------------------------------------


def _save_tiny_hf_clip(folder):
    transformers = pytest.importorskip("transformers")
    from tests.hf_models import save_tiny

    model = save_tiny(folder, "clip")
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in letters + [".", "{", "}"]:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>"
    )
    tok.save_pretrained(folder)
    return model, tok


def test_hf_clip_matches_the_model_and_handles_both_output_types(tmp_path):
    model, tok = _save_tiny_hf_clip(tmp_path)
    clip = create_clip(f"hf:{tmp_path}")
    assert clip.embed_dim == 16 and clip.image_size == 32
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.vision_model(pixel_values=x).pooler_output
        expected = F.normalize(model.visual_projection(pooled), dim=-1)
    torch.testing.assert_close(clip.encode_image(x), expected, atol=1e-5, rtol=1e-5)
    text = clip.encode_text(["a cat.", "a dog."])
    assert text.shape == (2, 16) and _unit_rows(text)
    with pytest.raises(InputError, match="dense"):
        clip.encode_dense(x)


def test_projected_reads_tensors_and_output_objects():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from hbird.zeroshot.clip.hf_backend import projected

    emb = torch.randn(2, 4)
    assert projected(emb) is emb  # transformers 4.x
    out = BaseModelOutputWithPooling(last_hidden_state=torch.zeros(2, 3, 4), pooler_output=emb)
    assert projected(out) is emb  # transformers 5.x
