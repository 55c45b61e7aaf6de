"""The Hugging Face backend (``hf:<folder>``) with tiny random models saved locally."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hbird._optional
from hbird.encoders import create_encoder
from hf_models import save_tiny

transformers = pytest.importorskip("transformers")


def final_patch_tokens(model, kind: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle from the model's own outputs: (last layer normed, first layer) patch tokens."""
    vision = model.vision_model if kind == "clip" else model
    kwargs = {} if kind.startswith("dinov2") else {"interpolate_pos_encoding": True}
    with torch.no_grad():
        out = vision(pixel_values=x, output_hidden_states=True, **kwargs)
        if kind.startswith("clip"):
            post_norm = (
                vision.post_layernorm
                if hasattr(vision, "post_layernorm")
                else vision.vision_model.post_layernorm
            )
            last = post_norm(out.last_hidden_state)
        else:
            last = out.last_hidden_state  # ViT / DINOv2 apply their layernorm here
    prefix = 5 if kind == "dinov2_reg" else 1
    return last[:, prefix:], out.hidden_states[1][:, prefix:]


@pytest.mark.parametrize("kind", ["vit", "dinov2", "dinov2_reg", "clip_vision", "clip"])
def test_hf_models_match_their_own_outputs(tmp_path: Path, kind: str) -> None:
    model = save_tiny(tmp_path, kind)
    enc = create_encoder(f"hf:{tmp_path}", pretrained=True)
    assert (enc.patch_size, enc.embed_dim, enc.num_blocks) == (8, 32, 2)
    assert enc.num_prefix_tokens == (5 if kind == "dinov2_reg" else 1)
    assert enc.weights_source == f"hf:{tmp_path}" and not enc.training
    assert all(not p.requires_grad for p in enc.parameters())
    x = torch.randn(2, 3, 40, 56)  # not the configured 32x32: position encodings interpolate
    last, first = final_patch_tokens(model, kind, x)
    with torch.no_grad():
        out = enc(x)
        both = enc(x, layers=[0, -1])
    assert out.shape == (2, 5, 7, 32)
    torch.testing.assert_close(out, last.reshape(2, 5, 7, 32), rtol=0, atol=0)
    torch.testing.assert_close(both[..., :32], first.reshape(2, 5, 7, 32), rtol=0, atol=0)
    torch.testing.assert_close(both[..., 32:], out, rtol=0, atol=0)


def test_normalisation_from_processor_config_or_family_default(tmp_path: Path) -> None:
    save_tiny(tmp_path / "clip", "clip_vision")
    assert create_encoder(f"hf:{tmp_path / 'clip'}").mean == pytest.approx(
        (0.48145466, 0.4578275, 0.40821073)
    )
    save_tiny(tmp_path / "vit", "vit")
    transformers.ViTImageProcessor(
        image_mean=[0.1, 0.2, 0.3], image_std=[0.4, 0.5, 0.6]
    ).save_pretrained(tmp_path / "vit")
    enc = create_encoder(f"hf:{tmp_path / 'vit'}")
    assert enc.mean == pytest.approx((0.1, 0.2, 0.3)) and enc.std == pytest.approx((0.4, 0.5, 0.6))


def test_pretrained_false_builds_random_weights_from_the_config(tmp_path: Path) -> None:
    model = save_tiny(tmp_path, "dinov2")
    enc = create_encoder(f"hf:{tmp_path}", seed=5)  # save_tiny built its model at seed 0
    assert enc.weights_source == "random:seed=5"
    saved = model.embeddings.patch_embeddings.projection.weight
    weight = lambda e: e.model.embeddings.patch_embeddings.projection.weight  # noqa: E731
    assert not torch.equal(weight(enc), saved)
    # seeded like timm names: the same weights again, whatever the global RNG did before,
    # and the global RNG is left where it was
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    again = create_encoder(f"hf:{tmp_path}", seed=5)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(weight(again), weight(enc))
    other = create_encoder(f"hf:{tmp_path}")
    assert other.weights_source == "random:seed=0" and not torch.equal(weight(other), weight(enc))


def test_clear_errors(tmp_path: Path, monkeypatch) -> None:
    transformers.BertConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'bert' model; the hf: backend supports"):
        create_encoder(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="weights from the model id or folder"):
        create_encoder(f"hf:{tmp_path}", weights="w.safetensors")
    monkeypatch.setattr(hbird._optional, "is_available", lambda module: False)
    with pytest.raises(ImportError, match=r"hbird\[hf\]"):
        create_encoder("hf:facebook/dinov2-small")
