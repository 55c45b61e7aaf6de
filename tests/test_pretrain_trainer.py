"""The trainer end to end on CPU: checkpoints load as encoders, resume is exact, eval is logged."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hbird.encoders import create_encoder
from hbird.errors import InputError
from hbird.predictor import InContextPredictor
from hbird.pretrain import PretrainConfig, Trainer, encoder_from_checkpoint, read_metadata
from hbird.pretrain.checkpoint import EXPORT_NAME, STATE_NAME
from hbird.pretrain.data import SyntheticImages
from hbird.pretrain.evaluation import RetrievalProbe, synthetic_set
from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options
from oracles import miou


@pytest.fixture(scope="module")
def images():
    return SyntheticImages(n=16, seed=11, size=48)


def config(tmp_path, name="hummingbird", **kw):
    base = dict(
        objective=name,
        objective_options=tiny_options(name),
        arch=TINY_ARCH,
        model_kwargs=TINY_VIT_KWARGS,
        steps=4,
        batch_size=8,
        crop_size=32,
        warmup_steps=1,
        num_workers=0,
        log_every=1,
        out=str(tmp_path / "run"),
    )
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, images):
    tmp = tmp_path_factory.mktemp("run")
    probe = RetrievalProbe(synthetic_set(4, 100, 48), synthetic_set(3, 200, 48), image_size=48, k=5)
    trainer = Trainer(config(tmp, eval_every=2), images=images, probe=probe, log=lambda _: None)
    last = trainer.fit()
    return trainer, last, tmp / "run"


def test_run_folder_has_checkpoints_config_and_metrics(finished_run):
    trainer, last, out = finished_run
    assert trainer.step == 4 and last["step"] == 4
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    evaluated = [r["step"] for r in records if "eval/miou" in r]
    assert evaluated == [0, 2, 4]  # before training, every eval_every steps, at the end
    assert all("loss" in r and "lr" in r for r in records[1:])
    saved = json.loads((out / "config.json").read_text())
    assert saved["objective"] == "hummingbird" and saved["model_kwargs"] == TINY_VIT_KWARGS


def test_last_logged_eval_is_the_retrieval_miou_of_the_exported_weights(finished_run):
    _, _, out = finished_run
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["eval/miou"] for r in records if r["step"] == 4)
    # the probe's protocol by hand: the exported step-4 weights as an encoder, a bank of
    # the probe's prompt set, its query set scored by a numpy mIoU
    prompt, query = synthetic_set(4, 100, 48), synthetic_set(3, 200, 48)
    predictor = InContextPredictor(
        encoder=encoder_from_checkpoint(out / EXPORT_NAME),
        image_size=48,
        k=5,
        temperature=0.02,
        memory_size=None,
        index="exact",
        progress=False,
    ).fit(prompt.images, prompt.masks, num_classes=4)
    want = miou(predictor.predict(query.images), query.masks, 4)
    assert logged == pytest.approx(want, abs=1e-9)


def test_checkpoint_is_a_plain_timm_state_dict_with_metadata(finished_run):
    trainer, _, out = finished_run
    weights = load_file(str(out / EXPORT_NAME))
    expected = trainer.objective.backbone.model.state_dict()
    assert weights.keys() == expected.keys()
    for k in weights:
        torch.testing.assert_close(weights[k], expected[k])
    meta = read_metadata(out / EXPORT_NAME)
    assert meta["arch"] == TINY_ARCH and meta["objective"] == "hummingbird"
    assert json.loads(meta["model_kwargs"]) == TINY_VIT_KWARGS and meta["step"] == "4"


def test_checkpoint_loads_through_the_encoder_registry(finished_run):
    trainer, _, out = finished_run
    backbone = trainer.objective.backbone.eval()
    x = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        expected = backbone(backbone.normalize(x)).patches  # (2, 6, 8, 32)
    for encoder in (
        create_encoder(TINY_ARCH, weights=out / EXPORT_NAME, **TINY_VIT_KWARGS),
        encoder_from_checkpoint(out / EXPORT_NAME),
    ):
        assert encoder.weights_source.endswith(EXPORT_NAME)
        with torch.no_grad():
            got = encoder.forward_patches(encoder.normalize(x))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_checkpoint_carries_its_architecture_options(finished_run):
    _, _, out = finished_run
    # the default vit_tiny_patch16_224 has another patch size and width; the options in
    # the file's metadata rebuild the pretrained network, as `hbird predict --encoder
    # vit_tiny_patch16_224 --weights checkpoint.safetensors` needs
    encoder = create_encoder(TINY_ARCH, weights=out / EXPORT_NAME)
    assert (encoder.patch_size, encoder.embed_dim) == (
        TINY_VIT_KWARGS["patch_size"],
        TINY_VIT_KWARGS["embed_dim"],
    )
    assert encoder.identity() == encoder_from_checkpoint(out / EXPORT_NAME).identity()
    # an explicit option still wins, and a wrong one is refused clearly
    with pytest.raises(InputError, match="patch"):
        create_encoder(TINY_ARCH, weights=out / EXPORT_NAME, patch_size=16)


def test_checkpoint_drives_in_context_prediction(finished_run, scenes):
    _, _, out = finished_run
    prompt, query = scenes
    predictor = InContextPredictor(
        encoder=encoder_from_checkpoint(out / EXPORT_NAME),
        image_size=64,
        k=5,
        index="exact",
        progress=False,
    ).fit([s.image for s in prompt[:4]], [s.mask for s in prompt[:4]], num_classes=4)
    masks = predictor.predict(torch.stack([s.image for s in query[:2]]))
    assert masks.shape == (2, 64, 80)
    # k = 1 on the prompt itself: every patch retrieves its own entry (cosine 1), so the
    # soft labels are each 8x8 patch's class fractions, counted here from the masks
    predictor.k = 1
    for sample, pred in zip(prompt[:4], predictor.predict_dense([s.image for s in prompt[:4]])):
        blocks = sample.mask.numpy().reshape(8, 8, 10, 8).transpose(0, 2, 1, 3).reshape(8, 10, 64)
        fractions = np.stack([(blocks == c).mean(-1) for c in range(4)], axis=-1)  # (8, 10, 4)
        np.testing.assert_allclose(pred.patch_labels.numpy(), fractions, atol=1e-6)


@pytest.mark.parametrize("name", ["hummingbird", "ibot"])
def test_resume_continues_exactly(tmp_path, images, name):
    straight = Trainer(config(tmp_path / "a", name), images=images, log=lambda _: None)
    straight.fit()

    cfg_b = config(tmp_path / "b", name)
    first = Trainer(cfg_b, images=images, log=lambda _: None)
    first.out.mkdir(parents=True)
    for batch in first.batches():  # stop after 2 of 4 steps, as if killed after a save
        first.train_step(batch)
        if first.step == 2:
            break
    first.save()
    resumed = Trainer(
        PretrainConfig(**{**cfg_b.to_dict(), "resume": True}), images=images, log=lambda _: None
    )
    resumed.fit()
    assert resumed.step == 4
    a = load_file(str(tmp_path / "a" / "run" / STATE_NAME))
    b = load_file(str(tmp_path / "b" / "run" / STATE_NAME))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_an_existing_run_is_not_overwritten(finished_run, images):
    trainer, _, out = finished_run
    again = Trainer(
        PretrainConfig(**{**trainer.config.to_dict(), "eval_every": 0}),
        images=images,
        log=lambda _: None,
    )
    with pytest.raises(InputError, match="--resume"):
        again.fit()
    other = PretrainConfig(
        **{
            **trainer.config.to_dict(),
            "objective": "co2",
            "resume": True,
            "objective_options": tiny_options("co2"),
        }
    )
    with pytest.raises(InputError, match="does not fit|trained with"):
        Trainer(other, images=images, log=lambda _: None).fit()


def test_config_is_validated(tmp_path):
    with pytest.raises(ValueError, match="unknown objective"):
        PretrainConfig(objective="simclr").validate()
    with pytest.raises(ValueError, match="eval_prompt"):
        PretrainConfig(eval_prompt="synthetic:n=2:seed=0").validate()
    with pytest.raises(InputError, match="no pretraining data"):
        next(Trainer(config(tmp_path), log=lambda _: None).batches())


def test_learning_rate_warms_up_then_decays(tmp_path):
    trainer = Trainer(config(tmp_path, steps=10, warmup_steps=2, lr=1e-3, min_lr=0.0))
    lrs = [trainer.learning_rate(s) for s in range(10)]
    assert lrs[0] == pytest.approx(5e-4) and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] < 1e-4 and lrs == sorted(lrs[:2]) + sorted(lrs[2:], reverse=True)


def test_weight_decay_skips_biases_norms_and_tokens(tmp_path):
    trainer = Trainer(config(tmp_path))
    decay, no_decay = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.objective.named_parameters()}
    assert decay["weight_decay"] > 0 and no_decay["weight_decay"] == 0
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert any(n.endswith("pos_embed") for n in skipped)
    assert any(n.endswith("cls_token") for n in skipped)
    assert all(p.ndim >= 2 for p in decay["params"])
