"""FUNGI presets and reproducibility: the defaults are FUNGI's Table 17 (appendix B.1,
``shared/papers/fungi.txt``) and the authors' code; ``fast`` is hbird's older settings;
every random draw can be given; saved extractors check their projection's hash."""

import hashlib
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from hbird.data.synthetic import make_scenes
from hbird.encoders import create_encoder
from hbird.errors import InputError
from hbird.fungi import FungiExtractor, ImageBackbone, create_loss
from hbird.fungi.views import MultiCrop

SMALL = {"dino": {"num_local": 2, "local_size": 16}, "simclr": {"num_negative_inputs": 3}}


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("test_vit")


@pytest.fixture(scope="module")
def images():
    return [s.image for s in make_scenes(6, seed=11, size=(40, 48))]


# -- defaults: FUNGI Table 17 ---------------------------------------------------------------


def test_default_losses_are_table_17_at_224(encoder):
    """Table 17 (image gradients setup) and appendix B.1 of FUNGI, at the paper's 224."""
    backbone = ImageBackbone(encoder, image_size=224)
    kl = create_loss("kl", backbone, seed=0)
    assert kl.settings == {"temperature": 15.0, "head_dim": 768}  # KL: temp 15, proj 768
    dino = create_loss("dino", backbone, seed=0)
    assert dino.student.weight.shape == dino.teacher.weight.shape == (2048, 32)  # proj 2048
    assert (dino.teacher_temperature, dino.student_temperature) == (0.07, 0.1)
    crops = dino.crops
    assert (crops.num_global, crops.num_local) == (2, 10)
    assert crops.scales == ((0.25, 1.0), (0.05, 0.25))
    assert (crops.global_size, crops.local_size) == (224, 224)  # both 224 × 224
    assert crops.boxes == "per-image" and crops.interpolation == "bicubic"  # authors' code
    simclr = create_loss("simclr", backbone, seed=0)
    assert simclr.head.weight.shape == (96, 32) and simclr.temperature == 0.07
    assert simclr.num_negative_inputs == 256  # Neg. Batch 256 × 49
    grid = simclr.views
    assert grid.num_patches == 49 and grid.patch == 112  # 49 views of 112 × 112
    assert grid.offsets == list(range(0, 109, 18))  # stride int(112 / 6) = 18 (code)
    assert grid.view_size == 224 and grid.interpolation == "bicubic"  # upsampled (code)
    # KL view (authors' code): Resize((256, 256)), then CenterCrop(224)
    assert backbone.canvas_size == 256
    canvas = backbone.prepare([torch.rand(3, 300, 400)])
    assert canvas.shape == (1, 3, 256, 256)
    (view,) = kl.make_views(canvas)
    assert torch.equal(view.views, canvas[:, :, 16:240, 16:240])


def test_default_simclr_negative_batch_is_256_inputs_times_49_views(encoder):
    """Table 17: Neg. Batch 256 × 49 (16-pixel inputs keep the test light)."""
    backbone = ImageBackbone(encoder, image_size=16)
    loss = create_loss("simclr", backbone, seed=0)
    assert loss.views.num_patches == 49  # Pos. Views 49 at any input side
    inputs = [torch.rand(3, 16, 16) for _ in range(260)]
    loss.fit(backbone, inputs, batch_size=64)
    assert loss.negatives.shape == (256 * 49, 32)


def test_extractor_defaults_to_the_paper_preset(encoder, images):
    fx = FungiExtractor(encoder, image_size=32, loss_options=SMALL).fit(images[:3])
    config = fx.config()
    assert config["preset"] == "paper" and config["resize"] == "square"
    assert config["losses"]["dino"]["boxes"] == "per-image"
    assert (
        config["losses"]["simclr"]["view_size"] == 32
        and config["losses"]["simclr"]["grid"] == "unfold"
    )


def test_paper_bf16_preset_is_the_paper_preset_under_bf16_autocast(encoder, images):
    """``paper_bf16``: the paper's views and losses, the model's forward passes under bf16
    autocast. It equals ``paper`` with ``autocast="bf16"`` bit for bit, and its features
    stay within bf16 rounding of the float32 ones (the oracle: ``paper``, float32)."""
    base = dict(seed=0, image_size=32, batch_size=4, loss_options=SMALL)
    half = FungiExtractor(encoder, preset="paper_bf16", **base).fit(images[:4])
    config = half.config()
    assert config["autocast"] == "bf16" and config["resize"] == "square"
    paper = FungiExtractor(encoder, **base).fit(images[:4])
    assert {k: v.settings for k, v in half.losses_.items()} == {
        k: v.settings for k, v in paper.losses_.items()
    }
    explicit = FungiExtractor(encoder, autocast="bf16", **base).fit(images[:4])
    got, full = half.extract_parts(images[4:]), paper.extract_parts(images[4:])
    same = explicit.extract_parts(images[4:])
    for name, part in got.items():
        assert torch.equal(part, same[name]), name
        assert float((part * full[name]).sum(1).min()) > 0.999, name
    assert not torch.equal(got["embedding"], full["embedding"])  # autocast is on
    overridden = FungiExtractor(encoder, preset="paper_bf16", autocast="fp16", **base)
    overridden._build()
    assert overridden.autocast_dtype_ == torch.float16


# -- fast: hbird's older settings ------------------------------------------------------------


def test_fast_preset_settings_are_the_older_defaults(encoder):
    fx = FungiExtractor(encoder, preset="fast")
    fx._build()
    settings = {name: loss.settings for name, loss in fx.losses_.items()}
    assert fx.backbone_.resize == "short-side" and fx.backbone_.canvas_size == 224
    dino = settings["dino"]
    assert (dino["local_size"], dino["boxes"], dino["interpolation"]) == (96, "shared", "bilinear")
    simclr = settings["simclr"]
    assert simclr["num_negative_inputs"] == 64
    assert simclr["view_size"] == 112 and simclr["grid"] == "spread"
    assert fx.losses_["simclr"].views.offsets == [0, 19, 37, 56, 75, 93, 112]


def test_fast_preset_gives_the_features_of_hbird_before_the_paper_defaults(encoder, images):
    """Golden values computed with hbird at commit 3401c97 (before presets existed, default
    settings): each part's dot product with a seeded probe vector."""
    fx = FungiExtractor(encoder, seed=0, image_size=32, batch_size=4, preset="fast")
    parts = fx.fit(images[:4]).extract_parts(images[4:])
    probe = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = {
        "kl": [-1.620987, -1.519408],
        "dino": [0.510312, 1.653177],
        "simclr": [1.560137, -0.604303],
        "embedding": [1.005114, 1.761868],
    }
    for name, values in before.items():
        assert (parts[name].double() @ probe).tolist() == pytest.approx(values, abs=2e-6), name


def test_unknown_preset_is_refused(encoder, images):
    with pytest.raises(ValueError, match="paper, fast"):
        FungiExtractor(encoder, preset="quick").fit(images[:2])


# -- every draw can be given ----------------------------------------------------------------


def test_given_heads_and_projection_give_the_hand_computed_features(encoder, images):
    """KL gradient by plain autograd of KL(U ‖ softmax(h(z)/τ)) with the given head,
    projected by the given matrix: ``g P``, then L2-normalised."""
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(768, 32, generator=gen), torch.randn(768, generator=gen)
    matrix = torch.randn(32 * 33, 32, generator=gen)
    fx = FungiExtractor(
        encoder, losses=("kl",), image_size=32, heads={"kl": (weight, bias)}, projection=matrix
    ).fit(images[:2])
    got = fx.extract_parts(images[2:4])["kl"]
    backbone, layer = fx.backbone_, fx.layer_
    layer.requires_grad_(True)
    try:
        rows = []
        for image in images[2:4]:
            z = F.normalize(backbone.embed(backbone.input_view(backbone.prepare([image]))), dim=-1)
            log_p = F.log_softmax((z @ weight.T + bias) / 15.0, dim=-1)[0]
            loss = (torch.full((768,), 1 / 768) * (torch.log(torch.tensor(1 / 768)) - log_p)).sum()
            gw, gb = torch.autograd.grad(loss, [layer.weight, layer.bias])
            rows.append(torch.cat([gw, gb[:, None]], dim=1).flatten())
    finally:
        layer.requires_grad_(False)
    expected = F.normalize(torch.stack(rows) @ matrix, dim=-1)
    assert torch.allclose(got, expected, atol=1e-5)
    assert fx.config()["given"] == {"kl.head": "given weight and bias", "projection": "matrix"}


def test_a_projection_seed_is_independent_of_the_extractor_seed(encoder, images):
    a = FungiExtractor(encoder, losses=("kl",), image_size=32, seed=0, projection=7).fit(images[:2])
    b = FungiExtractor(encoder, losses=("kl",), image_size=32, seed=7).fit(images[:2])
    assert torch.equal(a.projection_.matrix(), b.projection_.matrix())
    with pytest.raises(ValueError, match=r"\(gradient_dim, D\)"):
        FungiExtractor(encoder, losses=("kl",), image_size=32, projection=torch.zeros(5, 32)).fit(
            images[:2]
        )


def test_dino_heads_are_named_and_checked(encoder, images):
    with pytest.raises(ValueError, match="name one"):
        FungiExtractor(encoder, losses=("dino",), image_size=32, heads={"dino": (1, 2)}).fit(
            images[:2]
        )
    with pytest.raises(ValueError, match=r"weight \(2048, 32\)"):
        FungiExtractor(
            encoder, losses=("dino",), image_size=32, heads={"dino.student": torch.nn.Linear(32, 9)}
        ).fit(images[:2])


def test_given_negatives_replace_the_seeded_choice(encoder, images):
    base = dict(losses=("simclr",), image_size=32, preset="fast")
    seeded = FungiExtractor(encoder, **base, loss_options={"simclr": {"num_negative_inputs": 2}})
    seeded.fit(images[:4])
    chosen = seeded.losses_["simclr"].negatives
    # the same negatives given as embeddings: the same features
    given = FungiExtractor(encoder, **base, negatives=chosen.clone()).fit(images[:4])
    assert torch.equal(given.transform(images[4:]), seeded.transform(images[4:]))
    assert given.config()["given"] == {"simclr.negatives": "embeddings (98, 32)"}
    # given as inputs: their 49 patches each are embedded
    by_inputs = FungiExtractor(encoder, **base, negatives=images[4:6]).fit(images[:4])
    loss = by_inputs.losses_["simclr"]
    (group,) = loss.make_views(by_inputs.backbone_.prepare(images[4:6]))
    with torch.no_grad():
        assert torch.allclose(loss.negatives, by_inputs.backbone_.embed(group.views), atol=1e-6)
    with pytest.raises(ValueError, match="simclr loss is not in losses"):
        FungiExtractor(encoder, losses=("kl",), negatives=chosen).fit(images[:4])
    with pytest.raises(ValueError, match=r"\(N, 32\) embeddings"):
        FungiExtractor(encoder, **base, negatives=torch.zeros(4, 7)).fit(images[:4])


def test_given_crop_boxes_replace_the_draws(encoder, images, tmp_path):
    options = {"dino": {"num_local": 2, "local_size": 16, "boxes": "shared"}}
    shared = FungiExtractor(encoder, losses=("dino",), image_size=32, loss_options=options)
    shared.fit(images[:2])
    boxes = shared.losses_["dino"].crops.shared
    options = {"dino": {"num_local": 2, "local_size": 16}}
    given = FungiExtractor(
        encoder, losses=("dino",), image_size=32, loss_options=options, crop_boxes=boxes
    ).fit(images[:2])
    assert torch.equal(given.transform(images[2:]), shared.transform(images[2:]))
    assert given.config()["losses"]["dino"]["boxes"] == [
        [b.top, b.left, b.height, b.width] for b in boxes
    ]
    function = FungiExtractor(
        encoder, losses=("dino",), image_size=32, loss_options=options, crop_boxes=lambda im: boxes
    ).fit(images[:2])
    assert torch.equal(function.transform(images[2:]), shared.transform(images[2:]))
    with pytest.raises(InputError, match="function"):
        function.save(tmp_path / "fx")
    assert not (tmp_path / "fx").exists()


def test_crop_seed_is_separate_and_recorded(encoder, images):
    options = {"dino": {"num_local": 2, "local_size": 16, "crop_seed": 5}}
    fx = FungiExtractor(encoder, losses=("dino",), image_size=32, loss_options=options)
    fx.fit(images[:2])
    canvas = fx.backbone_.prepare(images[:1])[0]
    crops = MultiCrop(fx.backbone_.canvas_size, 32, 16, num_local=2, seed=5)
    assert fx.losses_["dino"].crops.boxes_for(canvas) == crops.boxes_for(canvas)
    assert fx.config()["losses"]["dino"]["crop_seed"] == 5


# -- saved extractors -----------------------------------------------------------------------


def test_saved_extractor_records_hash_versions_and_crop_seed(encoder, images, tmp_path):
    fx = FungiExtractor(encoder, image_size=32, loss_options=SMALL, seed=3).fit(images[:3])
    path = fx.save(tmp_path / "fx")
    config = json.loads((path / "fungi.json").read_text())
    signs = fx.projection_.matrix().to(torch.int8)  # the ±1 matrix, row-major
    assert config["projection"]["sha256"] == hashlib.sha256(signs.numpy().tobytes()).hexdigest()
    assert config["hbird_version"] and config["torch_version"] == torch.__version__
    assert config["losses"]["dino"]["crop_seed"] == 3
    loaded = FungiExtractor.load(path, encoder)
    assert torch.equal(loaded.transform(images[3:]), fx.transform(images[3:]))


def test_load_refuses_a_projection_torch_now_draws_differently(
    encoder, images, tmp_path, monkeypatch
):
    fx = FungiExtractor(encoder, losses=("kl",), image_size=32).fit(images[:2])
    path = fx.save(tmp_path / "fx")
    original = torch.randint

    def other_rng(*args, **kwargs):  # a torch whose generator draws other bits
        return 1 - original(*args, **kwargs)

    monkeypatch.setattr(torch, "randint", other_rng)
    with pytest.raises(InputError, match="draws another matrix from seed 0"):
        FungiExtractor.load(path, encoder)


def test_load_refuses_a_tampered_projection_matrix(encoder, images, tmp_path):
    matrix = torch.randn(32 * 33, 32, generator=torch.Generator().manual_seed(1))
    fx = FungiExtractor(encoder, losses=("kl",), image_size=32, projection=matrix)
    path = fx.fit(images[:2]).save(tmp_path / "fx")
    loaded = FungiExtractor.load(path, encoder)
    assert torch.equal(loaded.transform(images[2:]), fx.transform(images[2:]))
    tensors = load_file(str(path / "tensors.safetensors"))
    tensors["projection.matrix"][0, 0] += 1e-3
    save_file(tensors, str(path / "tensors.safetensors"))
    with pytest.raises(InputError, match="the saved matrix was changed"):
        FungiExtractor.load(path, encoder)


def test_format_1_extractors_load_with_the_fast_settings(encoder, images, tmp_path):
    """A file written before presets (format 1: no preset, resize or hash) is read as
    ``fast``, the settings it was computed with."""
    fx = FungiExtractor(encoder, image_size=32, loss_options=SMALL, preset="fast").fit(images[:3])
    path = fx.save(tmp_path / "fx")
    config = json.loads((path / "fungi.json").read_text())
    for key in ("preset", "resize", "given", "hbird_version", "torch_version"):
        del config[key]
    for key in ("boxes", "interpolation", "crop_seed"):
        del config["losses"]["dino"][key]
    for key in ("grid", "view_size", "interpolation"):
        del config["losses"]["simclr"][key]
    del config["projection"]["kind"], config["projection"]["sha256"]
    config["format_version"] = 1
    (path / "fungi.json").write_text(json.dumps(config))
    loaded = FungiExtractor.load(path, encoder)
    assert torch.equal(loaded.transform(images[3:]), fx.transform(images[3:]))


# -- texts: FUNGI Table 19 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_backbone(tmp_path_factory):
    pytest.importorskip("transformers")
    from text_models import tiny_text_backbone

    return tiny_text_backbone(tmp_path_factory.mktemp("bert"), weight_seed=0)


def test_default_text_losses_are_table_19(text_backbone):
    """Table 19 (appendix B.3): KL temperature 15, projection 768; SimCLR 12 positive
    views, 2 negative views, projection 256, negatives batch 256 × 2, temperature 0.07,
    word deletion p 0.1."""
    kl = create_loss("kl", text_backbone, seed=0)
    assert kl.settings == {"temperature": 15.0, "head_dim": 768}
    simclr = create_loss("simclr", text_backbone, seed=0)
    assert simclr.views.num_views == 12 and simclr.negative_views.num_views == 2
    assert simclr.views.p == simclr.negative_views.p == 0.1
    assert simclr.head.weight.shape == (256, 32) and simclr.temperature == 0.07
    texts = [" ".join(["the red cat"] * (1 + i % 3)) for i in range(260)]
    simclr.fit(text_backbone, texts, batch_size=130)
    assert simclr.negatives.shape == (256 * 2, 32)  # 256 texts × 2 views each


def test_fast_text_preset_gives_the_features_of_hbird_before_table_19(text_backbone):
    """Golden values computed with hbird at commit dd383f4 (text defaults before Table 19:
    8 views, head 96, negatives' views as the positives') under ``preset="fast"``: each
    part's dot product with a seeded probe vector."""
    from text_models import TEXTS

    fx = FungiExtractor(text_backbone, losses=("kl", "simclr"), seed=0, batch_size=4, preset="fast")
    parts = fx.fit(TEXTS[:4]).extract_parts(TEXTS[4:])
    simclr = fx.losses_["simclr"].settings
    assert (simclr["text_views"], simclr["text_negative_views"], simclr["head_dim"]) == (8, 8, 96)
    assert simclr["num_negative_inputs"] == 64
    probe = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    before = {
        "kl": [-0.285695, -0.295181],
        "simclr": [-1.779121, 1.523702],
        "embedding": [0.501241, 0.495599],
    }
    for name, values in before.items():
        assert (parts[name].double() @ probe).tolist() == pytest.approx(values, abs=2e-6), name
    paper = FungiExtractor(text_backbone, losses=("kl", "simclr"), seed=0, batch_size=4)
    paper_parts = paper.fit(TEXTS[:4]).extract_parts(TEXTS[4:])
    assert torch.equal(paper_parts["kl"], parts["kl"])  # KL is Table 19's in both
    assert not torch.allclose(paper_parts["simclr"], parts["simclr"], atol=1e-3)
