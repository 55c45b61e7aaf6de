"""Pretraining feature-map backbones (issue 12 part 5): Hummingbird, Hummingbird++,
local-to-global and CO2 train ELASTIC and Axial-ResNet through the Backbone protocol (a
global embedding plus ``(B, h, w, D)`` patches), and their checkpoints load through
``create_encoder(<arch>, weights=...)``; iBOT refuses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hbird.cli import main
from hbird.encoders import create_encoder
from hbird.encoders.registry import ENCODERS
from hbird.errors import InputError
from hbird.pretrain import PretrainConfig, Trainer, build_backbone, create_objective
from hbird.pretrain.backbone import FeatureMapBackbone
from hbird.pretrain.checkpoint import EXPORT_NAME, encoder_from_checkpoint
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.distributed import GlobalBatchNorm2d
from hbird.pretrain.presets import tiny_options

ARCHS = [a for a in ("test_elastic", "test_axial") if a in ENCODERS]
OBJECTIVES = ["hummingbird", "hummingbird++", "local_global", "co2"]


def short_config(out: Path, arch: str, objective: str, **changes) -> PretrainConfig:
    settings = dict(
        objective=objective,
        objective_options=tiny_options(objective),
        arch=arch,
        steps=2,
        batch_size=8,
        crop_size=32,
        num_workers=0,
        log_every=1,
        out=str(out),
    )
    return PretrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def images():
    return SyntheticImages(n=16, seed=5, size=48)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("arch", ARCHS)
def test_objective_trains_the_backbone_and_its_checkpoint_loads(tmp_path, images, arch, objective):
    trainer = Trainer(short_config(tmp_path / "run", arch, objective), images=images, log=print)
    backbone = trainer.objective.backbone
    assert isinstance(backbone, FeatureMapBackbone) and not backbone.supports_masking
    start = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainer.fit()
    records = [
        json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().split("\n")[:-1]
    ]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    path = tmp_path / "run" / EXPORT_NAME
    saved = load_file(str(path))
    exported = trainer.objective.export_backbone().model.state_dict()
    assert saved.keys() == exported.keys() == start.keys()  # the encoder's own keys
    moved = [
        k for k in saved if saved[k].is_floating_point() and not torch.equal(saved[k], start[k])
    ]
    assert moved, "training changed no weight"

    loaded = create_encoder(arch, weights=path)
    x = loaded.normalize(torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        want = trainer.objective.export_backbone().frozen_encoder().forward_patches(x)
        torch.testing.assert_close(loaded.forward_patches(x), want)
    assert encoder_from_checkpoint(path).identity() == loaded.identity()


def test_ibot_refuses_a_feature_map_backbone(tmp_path):
    backbone = build_backbone(ARCHS[0], seed=0)
    with pytest.raises(InputError, match=rf"ibot.*ViT.*{ARCHS[0]}.*hummingbird"):
        create_objective("ibot", backbone, tiny_options("ibot"))


def test_ibot_refusal_is_one_line_from_the_cli(tmp_path, capsys):
    argv = f"pretrain --objective ibot --arch {ARCHS[0]} --tiny --steps 1 --batch-size 4"
    argv += f" --data synthetic:n=4:size=32 --crop-size 32 --out {tmp_path / 'run'}"
    assert main(argv.split()) == 2
    err = capsys.readouterr().err
    assert "ibot" in err and "feature-map backbone" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_crop_size_must_be_a_multiple_of_the_output_stride(tmp_path, images):
    config = short_config(tmp_path / "run", ARCHS[0], "hummingbird", crop_size=40)
    with pytest.raises(InputError, match=r"--crop-size 40 .* stride 16.*--crop-size 48"):
        Trainer(config, images=images, log=lambda _: None)


def test_batch_norms_become_global_with_the_same_state():
    """GlobalBatchNorm2d keeps BatchNorm2d's state dict; in one process it is BatchNorm2d."""
    encoder = create_encoder(ARCHS[0])
    keys = encoder.state_dict().keys()
    backbone = FeatureMapBackbone(encoder, ARCHS[0])
    norms = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(type(m) is GlobalBatchNorm2d for m in norms)
    assert backbone.encoder.state_dict().keys() == keys
    bn, plain = norms[0], torch.nn.BatchNorm2d(norms[0].num_features)
    plain.load_state_dict(bn.state_dict())
    x = torch.randn(4, bn.num_features, 5, 3)
    torch.testing.assert_close(bn.train()(x), plain.train()(x))


def test_global_batch_norm_2d_matches_batch_norm_2d_on_the_whole_batch():
    """The all-reduce path (forced here in one process) gives BatchNorm2d's output and
    running statistics: mean and biased variance over (N, H, W) per channel."""
    from hbird.pretrain.distributed import global_batch_norm

    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 5, dtype=torch.float64) * 3 + 1
    plain = torch.nn.BatchNorm2d(3).double()
    ours = GlobalBatchNorm2d(3).double()
    with torch.no_grad():
        for bn in (plain, ours):
            bn.weight.copy_(torch.tensor([0.5, 1.0, 2.0]))
            bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    torch.testing.assert_close(global_batch_norm(ours, x), plain(x))
    torch.testing.assert_close(ours.running_mean, plain.running_mean)
    torch.testing.assert_close(ours.running_var, plain.running_var)


def test_axial_norms_become_global_and_match_the_local_ones(monkeypatch):
    """The axial layers normalise channels-last maps and channel slices (bn_similarity's
    three terms, bn_output's two) without calling their norms' forward; under DDP those go
    through the global path too. Forced here in one process (the all-reduce is then the
    identity), the global path must give the plain model's outputs and running statistics."""
    import hbird.pretrain.backbone as backbone_module
    from hbird.pretrain.backbone import (
        GlobalChannelsLastBatchNorm,
        GlobalSlicedBatchNorm2d,
        globalize_axial_norms,
    )

    plain = create_encoder("test_axial").model.double().train()
    ours = globalize_axial_norms(create_encoder("test_axial").model.double().train())
    kinds = {type(m) for m in ours.modules()}
    assert {GlobalChannelsLastBatchNorm, GlobalSlicedBatchNorm2d} <= kinds
    assert ours.state_dict().keys() == plain.state_dict().keys()
    monkeypatch.setattr(backbone_module, "is_distributed", lambda: True)
    calls, original = [], backbone_module.global_batch_norm

    def counted(norm, x):
        calls.append(x.shape[1])
        return original(norm, x)

    monkeypatch.setattr(backbone_module, "global_batch_norm", counted)
    x = torch.randn(3, 3, 48, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (want,), (got,) = plain.forward_stages(x, [3]), ours.forward_stages(x, [3])
    torch.testing.assert_close(got, want)
    # per axial layer: bn_qkv, 3 similarity terms, 2 output terms; per block bn1, bn2 (+ shortcut)
    layers = sum(isinstance(m, backbone_module.AxialAttention) for m in ours.modules())
    assert len(calls) >= layers * 6 + 4 * 2
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, msg=key)


# -- DDP: two processes with half the batch each ≡ one process --------------------------------


def run_hummingbird(root: Path, arch: str, dist=None) -> None:
    from test_pretrain_ddp import default_float64

    with default_float64():
        config = short_config(
            root / "hummingbird",
            arch,
            "hummingbird",
            objective_options=tiny_options("hummingbird", memory_size=12),
            steps=3,
            warmup_steps=1,
        )
        images = SyntheticImages(n=16, seed=5, size=48)
        Trainer(config, dist=dist, images=images, log=lambda _: None).fit()


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_two_processes_match_one_process(tmp_path, arch):
    from test_pretrain_ddp import check_same_run, run_in_two_processes

    run_hummingbird(tmp_path / "single", arch)
    run_in_two_processes(tmp_path / "init", run_hummingbird, tmp_path / "double", arch)
    check_same_run(tmp_path, "hummingbird")


# -- a few hundred CPU steps of Hummingbird improve held-out retrieval ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_hummingbird_pretraining_improves_retrieval_miou(tmp_path, arch):
    """As tests/test_pretrain_synthetic.py does for the tiny ViT: fresh seeded scenes of 8
    colour-jittered classes, eq.-1 retrieval on 32 + 32 held-out scenes at 64 pixels
    (a 4 × 4 patch grid at output stride 16). The numbers against test_vit:
    ``python benchmarks/pretrain_backbones.py``."""
    from hbird.pretrain.evaluation import RetrievalProbe, synthetic_set

    scenes = {"classes": 8, "colour_jitter": 0.4}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = RetrievalProbe(
            synthetic_set(32, 100, 64, **scenes),
            synthetic_set(32, 200, 64, **scenes),
            image_size=64,
            k=30,
            temperature=0.02,
        )
        config = short_config(
            tmp_path / "run", arch, "hummingbird", steps=200, batch_size=32, lr=1e-3,
            crop_size=64, num_workers=1, log_every=100,
        )  # fmt: skip
        images = SyntheticImages(n=50_000, seed=0, size=64, **scenes)
        Trainer(config, images=images, probe=probe, log=lambda _: None).fit()
    finally:
        torch.set_num_threads(threads)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    scores = [json.loads(x)["eval/miou"] for x in lines if "eval/miou" in x]
    assert len(scores) == 2
    assert scores[-1] > scores[0] + 0.01, scores


def test_a_registered_vit_is_pretrained_as_a_vit():
    backbone = build_backbone("test_vit")
    assert not isinstance(backbone, FeatureMapBackbone) and backbone.supports_masking
    out = backbone(backbone.normalize(torch.rand(2, 3, 32, 48)))
    assert out.patches.shape == (2, 4, 6, 32) and out.cls.shape == (2, 32)
    assert all(p.requires_grad for p in backbone.parameters())
