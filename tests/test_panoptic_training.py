"""The specialist trainer: crops and their targets, optimiser groups, the schedule, exact resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from hbird.data.panoptic_synthetic import SyntheticPanopticDataset
from hbird.errors import InputError
from hbird.panoptic.specialist import PanopticTarget, builtin_specialists
from hbird.panoptic.training import (
    MODEL_NAME,
    PanopticCrops,
    SpecialistConfig,
    SpecialistTrainer,
    load_specialist,
    parameter_groups,
    warmup_poly,
)
from hbird.pretrain.checkpoint import STATE_NAME

pytest.importorskip("timm")

TINY = {"backbone": "test_axial", "decoder_width": 0.25}


@pytest.fixture(scope="module")
def scenes():
    return SyntheticPanopticDataset(n=4, seed=3, size=32)


def config(out, **kw) -> SpecialistConfig:
    fields = dict(
        specialist_options=TINY,
        out=str(out),
        steps=8,
        batch_size=2,
        crop_size=32,
        min_scale=0.5,
        max_scale=1.5,
        num_workers=0,
        log_every=0,
    )
    return SpecialistConfig(**{**fields, **kw})


def test_crops_keep_image_and_labels_aligned_and_pad_with_void():
    """A 2× downscale of a 32-px scene into a 32-px crop pads 16 rows and columns: the
    image with the fill colour, the semantic map with void, the instances with 0."""
    image = torch.rand(3, 32, 32)
    semantic = torch.zeros(32, 32, dtype=torch.int64)
    semantic[:, 16:] = 1
    instance = (semantic == 1).long()
    crops = PanopticCrops(None, 32, 0.5, 0.5, flip=False, fill=(0.1, 0.2, 0.3))
    crop, target = crops.crop(image, semantic, instance, torch.Generator().manual_seed(0))
    assert crop.shape == (3, 32, 32) and target.semantic.shape == (32, 32)
    assert (target.semantic[16:] == 255).all() and (target.semantic[:, 16:] == 255).all()
    assert (target.instance[16:] == 0).all()
    assert torch.allclose(crop[:, 20, 20], torch.tensor([0.1, 0.2, 0.3]))
    assert (target.semantic[:16, :8] == 0).all() and (target.semantic[:16, 8:16] == 1).all()
    assert (target.instance[:16, 8:16] == 1).all()


def test_crops_are_a_function_of_seed_epoch_and_index(scenes):
    crops = PanopticCrops(scenes, 32, 0.5, 2.0, seed=1)
    a, b = crops[2], crops[2]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].instance, b[1].instance)
    crops.set_epoch(1)
    assert not torch.equal(crops[2][0], a[0])


def test_targets_are_made_at_the_crop_size(scenes, tmp_path):
    trainer = SpecialistTrainer(config(tmp_path / "r"), dataset=scenes, log=lambda _: None)
    images, targets = next(iter(trainer.batches()))
    assert images.shape == (2, 3, 32, 32) and all(isinstance(t, PanopticTarget) for t in targets)
    gt = trainer.module.targets(targets)
    assert gt["centre"].shape == (2, 32, 32) and gt["offset"].shape == (2, 2, 32, 32)


def test_backbone_parameters_learn_at_a_tenth_and_norms_have_no_decay(scenes, tmp_path):
    trainer = SpecialistTrainer(
        config(tmp_path / "r", weight_decay=0.01), dataset=scenes, log=lambda _: None
    )
    model = trainer.module
    groups = parameter_groups(model, 0.01, 0.1)
    backbone = {id(p) for p in model.backbone.parameters()}
    for g in groups:
        inside = {id(p) in backbone for p in g["params"]}
        assert len(inside) == 1
        assert g["lr_scale"] == (0.1 if inside == {True} else 1.0)
        assert g["weight_decay"] == (0.01 if all(p.ndim >= 2 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    trainer.train_step(next(iter(trainer.batches())))
    lrs = {g["lr_scale"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[0.1] == pytest.approx(0.1 * lrs[1.0])
    assert type(trainer.optimizer).__name__ == "Lookahead"


def test_warmup_then_poly():
    """Linear warm-up over 10 steps to 1e-3, then 1e-3 · (1 − t/100)^0.9."""
    assert warmup_poly(0, 100, 1e-3, 10, 0.9) == pytest.approx(1e-4)
    assert warmup_poly(9, 100, 1e-3, 10, 0.9) == pytest.approx(1e-3)
    assert warmup_poly(50, 100, 1e-3, 10, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    assert warmup_poly(100, 100, 1e-3, 10, 0.9) == 0.0


def test_resume_continues_exactly(scenes, tmp_path):
    """8 steps straight = 3 steps, a save, then a resumed run to 8 (Lookahead's slow
    weights sync at step 6, after the resume)."""
    straight = SpecialistTrainer(config(tmp_path / "a"), dataset=scenes, log=lambda _: None)
    straight.fit()
    cfg = config(tmp_path / "b")
    first = SpecialistTrainer(cfg, dataset=scenes, log=lambda _: None)
    first.out.mkdir(parents=True)
    for batch in first.batches():  # killed after 3 of 8 steps, after a save
        first.train_step(batch)
        if first.step == 3:
            break
    first.save()
    lines = []
    resumed = SpecialistTrainer(
        SpecialistConfig(**{**cfg.to_dict(), "resume": True}), dataset=scenes, log=lines.append
    )
    resumed.fit()
    assert resumed.step == 8 and any("resumed" in line and "step 3" in line for line in lines)
    a = load_file(str(tmp_path / "a" / STATE_NAME))
    b = load_file(str(tmp_path / "b" / STATE_NAME))
    assert a.keys() == b.keys() and any("lookahead_slow_buff" in k for k in a)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 8 and "eta" not in records[-1]


def test_the_saved_specialist_reloads_with_the_same_outputs(scenes, tmp_path):
    trainer = SpecialistTrainer(config(tmp_path / "r", steps=2), dataset=scenes, log=lambda _: None)
    model = trainer.fit_model()
    loaded = load_specialist(tmp_path / "r" / MODEL_NAME)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        for key, value in model(x).items():
            torch.testing.assert_close(loaded(x)[key], value)
    assert loaded.thing_classes == scenes.thing_classes and loaded.num_classes == 4


def test_bad_settings_and_folders_are_refused(scenes, tmp_path):
    with pytest.raises(InputError, match="unknown specialist"):
        SpecialistConfig(specialist="nope").validate()
    with pytest.raises(InputError, match="optimizer"):
        SpecialistConfig(optimizer="sgd").validate()
    with pytest.raises(InputError, match="multiple of"):
        SpecialistTrainer(config(tmp_path / "r", crop_size=40), dataset=scenes)
    with pytest.raises(InputError, match="holds no run"):
        SpecialistTrainer(config(tmp_path / "none", resume=True), dataset=scenes).fit()
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(InputError, match="not a readable safetensors"):
        load_specialist(tmp_path / "x.safetensors")
    state = tmp_path / "a" / STATE_NAME  # a trainer state is not a specialist
    SpecialistTrainer(config(tmp_path / "a", steps=1), dataset=scenes, log=lambda _: None).fit()
    with pytest.raises(InputError, match="not an hbird specialist"):
        load_specialist(state)


TINY_SPECIALIST_OPTIONS = {"panoptic-deeplab": TINY, "max-deeplab": {"preset": "tiny"}}
"""A tiny CPU configuration of every registered specialist (the contract test walks them)."""


@pytest.mark.parametrize("name", sorted(builtin_specialists()))
def test_every_specialist_trains_a_step_and_predicts_maps(name, scenes, tmp_path):
    assert name in TINY_SPECIALIST_OPTIONS, (
        f"specialist {name!r} has no tiny options in TINY_SPECIALIST_OPTIONS "
        "(tests/test_panoptic_training.py): add a CPU-sized configuration"
    )
    cfg = config(tmp_path / name, specialist=name, steps=1)
    cfg = SpecialistConfig(**{**cfg.to_dict(), "specialist_options": TINY_SPECIALIST_OPTIONS[name]})
    trainer = SpecialistTrainer(cfg, dataset=scenes, log=lambda _: None)
    record = trainer.fit()
    assert record["step"] == 1 and record["loss"] == record["loss"]  # finite, logged
    model = trainer.module.eval()
    assert trainer.module.name == name and isinstance(model.backbone, torch.nn.Module)
    with torch.no_grad():
        maps = model.predict(model(model.normalize(scenes[0].image[None])), (32, 32))
    assert len(maps) == 1 and maps[0].semantic.shape == (32, 32)
    assert maps[0].instance.dtype == torch.int64
    labels = set(torch.unique(maps[0].semantic).tolist())
    assert labels <= set(range(4)) | {255}


@pytest.mark.parametrize("name", sorted(builtin_specialists()))
def test_every_specialist_trains_in_float64(name, scenes, tmp_path):
    """A model built in float64 (default dtype float64) trains: the trainer casts the
    float32 images to the parameters' dtype and the losses compute in float64 (both
    failed before: a conv of float32 images, then the MaX-DeepLab losses' float32 masks)."""
    cfg = config(tmp_path / name, specialist=name, steps=1, log_every=1)
    cfg = SpecialistConfig(**{**cfg.to_dict(), "specialist_options": TINY_SPECIALIST_OPTIONS[name]})
    from test_pretrain_ddp import default_float64

    with default_float64():
        trainer = SpecialistTrainer(cfg, dataset=scenes, log=lambda _: None)
        assert scenes[0].image.dtype == torch.float32  # the cast is the trainer's
        batch = next(iter(trainer.batches()))
        record = trainer.fit()
    assert batch.images.dtype == torch.float64
    assert math.isfinite(record["loss"]) and record["step"] == 1
    assert all(p.dtype == torch.float64 for p in trainer.module.parameters())
    saved = load_file(str(tmp_path / name / MODEL_NAME))
    assert all(v.dtype == torch.float64 for v in saved.values() if v.is_floating_point())
