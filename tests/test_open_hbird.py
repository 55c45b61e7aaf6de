"""The ``open-hbird`` preset: open-hummingbird-eval's processing, pinned to hand-computed cases.

Its four departures from hbird's defaults (issue 10, section 2): ImageNet mean with the
mistyped std ``[0.229, 0.224, 0.255]`` for every model, images squashed to S×S, ignore
pixels pooled as class 0, and an augmented first memory pass. The expected values below
are computed in numpy from those definitions; no peer code is used.
"""

import numpy as np
import pytest
import torch

from hbird import InContextPredictor
from hbird.cli import build_parser, main
from hbird.cli.common import given_settings
from hbird.encoders import create_encoder
from hbird.encoders.normalization import parse_normalize
from hbird.errors import BankError, InputError
from hbird.eval.config import resolve_config
from hbird.memory.bank import MemoryBank
from hbird.memory.labels import pool_segmentation
from hbird.specs import BankSpec

PEER_NORMALIZE = "0.485,0.456,0.406/0.229,0.224,0.255"
MEANS = {  # (mean, std) per mode, written out by hand
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    PEER_NORMALIZE: ((0.485, 0.456, 0.406), (0.229, 0.224, 0.255)),
    "0.5,0.5,0.5/0.25,0.5,1": ((0.5, 0.5, 0.5), (0.25, 0.5, 1.0)),
}


def tiny_image() -> np.ndarray:
    """A non-square ``(3, 16, 32)`` image in [0, 1], every pixel different."""
    return (np.arange(3 * 16 * 32, dtype=np.float64).reshape(3, 16, 32) % 97) / 96.0


def halve_width(x: np.ndarray) -> np.ndarray:
    """Antialiased bilinear 2x downsampling along the last axis, by hand: output column j
    (centre 2j + 1 in input pixels) averages input columns 2j-1..2j+2 with triangle
    weights 1 - d/2 (d: distance of each column's centre, 0.5 or 1.5), renormalised
    where a column falls outside the image."""
    width = x.shape[-1]
    out = np.zeros(x.shape[:-1] + (width // 2,))
    for j in range(width // 2):
        taps = [t for t in range(2 * j - 1, 2 * j + 3) if 0 <= t < width]
        weights = np.array([1 - abs(t + 0.5 - (2 * j + 1)) / 2 for t in taps])
        out[..., j] = (x[..., taps] * weights).sum(-1) / weights.sum()
    return out


def encoder_inputs(predictor: InContextPredictor, images: list[torch.Tensor]) -> list[np.ndarray]:
    """The normalised tensors that reach ``forward_patches`` while ``images`` are predicted."""
    seen = []
    encoder = predictor.encoder_
    forward = encoder.forward_patches

    def spy(x, layers=None):
        seen.extend(v.numpy().astype(np.float64) for v in x)
        return forward(x, layers)

    encoder.forward_patches = spy
    try:
        predictor.predict(images)
    finally:
        del encoder.forward_patches
    return seen


def fitted(**settings) -> InContextPredictor:
    """test_vit (patch 8) at image_size 16, fitted on one 16x16 image with 3 classes."""
    p = InContextPredictor(
        encoder="test_vit", image_size=16, k=1, index="exact", progress=False, **settings
    )
    mask = torch.zeros(16, 16, dtype=torch.long)
    mask[:, 8:] = 1
    return p.fit(
        [torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))], [mask], num_classes=3
    )


def test_preset_sets_the_peers_processing():
    """The preset's values, against open-hummingbird-eval 2.0.0's defaults as its README
    and our issue 10 state them (input 224, k 30, β 0.02, one pass, all patches)."""
    cfg = resolve_config("open-hbird")
    assert parse_normalize(cfg.normalize) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.255))
    assert (cfg.resize, cfg.label_pooling, cfg.augment_first_epoch) == (
        "square",
        "ignore_as_class0",
        True,
    )
    assert (cfg.image_size, cfg.k, cfg.temperature, cfg.aug_epochs) == (224, 30, 0.02, 1)
    assert (cfg.memory_size, cfg.key_dtype, cfg.index) == (None, "float32", "exact")
    assert cfg.predictor_kwargs()["normalize"] == PEER_NORMALIZE


@pytest.mark.parametrize("resize", ["short-side", "square"])
@pytest.mark.parametrize("normalize", ["model", *MEANS])
def test_encoder_input_of_a_non_square_image_by_hand(normalize, resize):
    image = tiny_image()
    p = fitted(normalize=normalize, resize=resize)
    (seen,) = encoder_inputs(p, [torch.from_numpy(image).float()])
    view = image if resize == "short-side" else halve_width(image)  # 16x32 or 16x16
    mean, std = MEANS.get(normalize, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))  # test_vit's
    expected = (view - np.array(mean)[:, None, None]) / np.array(std)[:, None, None]
    assert seen.shape == expected.shape
    np.testing.assert_allclose(seen, expected, atol=1e-5)


def test_model_normalisation_is_the_encoders_own():
    encoder = create_encoder("test_vit")
    encoder.mean, encoder.std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    x = torch.from_numpy(tiny_image()).float()[None]
    p = InContextPredictor(encoder=encoder, image_size=16, progress=False)
    p._prepare(p.bank_spec)
    np.testing.assert_allclose(p.encoder_.normalize(x).numpy(), (x.numpy() - 0.5) / 0.5, atol=1e-6)
    p = InContextPredictor(encoder=encoder, image_size=16, normalize="imagenet", progress=False)
    p._prepare(p.bank_spec)
    assert p.encoder_.std == (0.229, 0.224, 0.225)
    assert encoder.std == (0.5, 0.5, 0.5)  # the caller's instance is left alone


def test_square_mode_predicts_at_the_original_size():
    p = fitted(resize="square")
    image = torch.rand(3, 16, 40, generator=torch.Generator().manual_seed(1))
    (pred,) = p.predict_dense([image])
    assert tuple(pred.patch_labels.shape[:2]) == (2, 2)  # squashed to 16x16: 2x2 patches
    assert tuple(pred.labels.shape) == (16, 40)
    (short,) = fitted().predict_dense([image])
    assert tuple(short.patch_labels.shape[:2]) == (2, 5)  # 16x40: aspect kept
    assert tuple(short.labels.shape) == (16, 40)


def test_ignore_as_class0_pooling_by_hand():
    mask = torch.tensor(
        [
            [1, 255, 2, 2],
            [255, 255, 2, 1],
            [255, 255, 0, 1],
            [255, 255, 255, 1],
        ]
    )
    values, valid = pool_segmentation(mask, 2, 3, 255, ignore_as_class0=True)
    # patch (0,0): 1, 255, 255, 255 → class 0 three times, class 1 once
    # patch (0,1): 2, 2, 2, 1; patch (1,0): all ignore → all class 0; patch (1,1): 0, 1, 255, 1
    expected = [[3 / 4, 1 / 4, 0], [0, 1 / 4, 3 / 4], [1, 0, 0], [2 / 4, 2 / 4, 0]]
    np.testing.assert_allclose(values.numpy(), expected)
    assert valid.all()
    values, valid = pool_segmentation(mask, 2, 3, 255)  # hbird's rule: ignore left out
    np.testing.assert_allclose(
        values[[0, 1, 3]].numpy(), [[0, 1, 0], [0, 1 / 4, 3 / 4], [1 / 3, 2 / 3, 0]]
    )
    assert valid.tolist() == [True, True, False, True]


def test_preset_bank_values_of_a_non_square_prompt_with_ignore_pixels():
    """A 16x32 prompt mask, squashed to 16x16 (nearest: input column 2j+1 for output j),
    pooled into 8x8 patches with ignore pixels as class 0; the first pass unaugmented
    here so the histograms can be counted by hand."""
    settings = {**resolve_config("open-hbird").predictor_kwargs(), "augment_first_epoch": False}
    settings.update(encoder="test_vit", image_size=16, pretrained=False, k=1)
    mask = torch.full((16, 32), 255, dtype=torch.long)
    mask[:8, 1:16:2] = 1  # top-left patch after squashing: 64 pixels of class 1
    mask[:8, 16:32] = 2  # top-right: all class 2
    mask[8:, 17:32:4] = 1  # bottom-right: output columns 8, 10, 12, 14 → 4 x 8 = 32 of class 1
    image = torch.rand(3, 16, 32, generator=torch.Generator().manual_seed(2))
    p = InContextPredictor(**settings, progress=False).fit([image], [mask], num_classes=3)
    expected = [[0, 1, 0], [0, 0, 1], [1, 0, 0], [1 / 2, 1 / 2, 0]]  # bottom-left: all ignore
    np.testing.assert_allclose(p.bank_.values.numpy(), expected)
    assert p.bank_.keys.dtype == torch.float32


def test_ignore_as_class0_is_refused_for_depth():
    p = InContextPredictor(encoder="test_vit", label_pooling="ignore_as_class0", progress=False)
    with pytest.raises(InputError, match="label_pooling=ignore_as_class0"):
        p.fit([torch.rand(3, 16, 16)], [torch.rand(16, 16) + 1], task="depth")


def test_bank_with_normalize_override_loads_by_name(tmp_path, capsys):
    queries = [torch.rand(3, 16, 24, generator=torch.Generator().manual_seed(3))]
    p = fitted(normalize="imagenet")
    p.save(tmp_path / "bank")
    manifest = MemoryBank.read_manifest(tmp_path / "bank")
    assert manifest["config"]["normalize"] == "imagenet"
    assert manifest["encoder"]["std"] == [0.229, 0.224, 0.225]
    loaded = InContextPredictor.load(tmp_path / "bank", progress=False)
    assert loaded.spec_.normalize == "imagenet"
    dense, again = p.predict_dense(queries)[0], loaded.predict_dense(queries)[0]
    torch.testing.assert_close(again.patch_labels, dense.patch_labels)
    assert torch.equal(again.labels, dense.labels)
    assert main(["bank", "info", str(tmp_path / "bank")]) == 0
    assert (
        "normalize imagenet, resize short-side, label pooling exclude_ignore"
        in capsys.readouterr().out
    )
    peer = fitted(normalize=PEER_NORMALIZE)  # another normalisation: another encoder identity
    assert peer.encoder_.identity()["config_hash"] != p.encoder_.identity()["config_hash"]


def test_bad_normalize_names_the_forms():
    with pytest.raises(InputError, match="MEAN,MEAN,MEAN/STD,STD,STD"):
        BankSpec(normalize="0.5,0.5/0.2,0.2,0.2").validate()
    with pytest.raises(ValueError, match="std must be > 0"):
        parse_normalize("0.5,0.5,0.5/0.2,0,0.2")


def test_cli_flags_come_from_the_spec_fields():
    args = build_parser().parse_args(
        [
            "predict",
            "--prompt",
            "p",
            "--query",
            "q",
            "--out",
            "o",
            "--key-dtype",
            "float32",
            "--augment-first-epoch",
            "--normalize",
            PEER_NORMALIZE,
            "--resize",
            "square",
            "--label-pooling",
            "ignore_as_class0",
        ]
    )
    assert given_settings(args, BankSpec) == {
        "key_dtype": "float32",
        "augment_first_epoch": True,
        "normalize": PEER_NORMALIZE,
        "resize": "square",
        "label_pooling": "ignore_as_class0",
    }


def test_bank_names_the_normalisation_it_was_built_with():
    bank = fitted(normalize="imagenet").bank_
    other = create_encoder("test_vit", normalize=PEER_NORMALIZE).identity()
    with pytest.raises(BankError, match=r"normalize=0.485,0.456,0.406/0.229,0.224,0.225"):
        bank.check_encoder(other, bank.feature_dim)
