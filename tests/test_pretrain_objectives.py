"""Objectives on a tiny ViT: gradients reach the online network only, EMA and queue updates."""

import pytest
import torch

from hbird.pretrain import Batch, build_backbone, create_objective
from hbird.pretrain.data import SyntheticImages, ViewDataset, collate
from hbird.pretrain.objective import OBJECTIVES as REGISTRY
from hbird.pretrain.presets import TINY_ARCH, TINY_VIT_KWARGS, tiny_options

OBJECTIVES = REGISTRY.names()
TARGETS = {"hummingbird": "target", "hummingbird++": "target", "ibot": "teacher", "co2": "momentum"}


def make_objective(name, **overrides):
    torch.manual_seed(0)
    backbone = build_backbone(TINY_ARCH, TINY_VIT_KWARGS, seed=0)
    extra = {"num_classes": 3} if REGISTRY.get(name).needs_labels else {}
    return create_objective(name, backbone, tiny_options(name, **overrides), **extra)


@pytest.fixture(scope="module")
def images():
    return SyntheticImages(n=8, seed=3, size=48)


def make_batch(objective, images, n=4, crop=32):
    data = ViewDataset(images, objective.views(crop), seed=0)
    batch = collate([data[i] for i in range(n)])
    return Batch([objective.backbone.normalize(v) for v in batch.views], batch.labels, batch.masks)


def target_of(objective):
    return getattr(objective, TARGETS[objective.name]) if objective.name in TARGETS else None


@pytest.mark.parametrize("name", OBJECTIVES)
def test_gradients_flow_to_the_online_network_only(name, images):
    objective = make_objective(name)
    batch = make_batch(objective, images)
    losses = objective(batch, progress=0.0)
    assert torch.isfinite(losses["loss"]) and losses["loss"].ndim == 0
    losses["loss"].backward()
    trainable = dict(objective.trainable_parameters())
    assert all(p.grad is not None for p in trainable.values()), [
        n for n, p in trainable.items() if p.grad is None
    ]
    backbone_grads = [p.grad for p in objective.backbone.parameters()]
    assert all(g is not None for g in backbone_grads)
    assert sum(float(g.abs().sum()) for g in backbone_grads) > 0
    target = target_of(objective)
    if target is not None:
        assert all(not p.requires_grad and p.grad is None for p in target.parameters())
        online_ids = {id(p) for p in trainable.values()}
        assert not any(id(p) in online_ids for p in target.parameters())


@pytest.mark.parametrize("name", ["hummingbird", "ibot", "co2"])
def test_after_step_is_the_ema_update(name, images):
    objective = make_objective(name)
    target = target_of(objective)
    online = {"hummingbird": "online", "ibot": "student", "co2": "online"}[name]
    online = getattr(objective, online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = {n: p.clone() for n, p in target.named_parameters()}
    progress = 0.5
    objective.after_step(progress)
    decay = {"hummingbird": 0.99, "co2": 0.999, "ibot": 0.998}[name]  # iBOT: cosine 0.996 → 1
    for n, p in online.named_parameters():
        expected = decay * before[n] + (1 - decay) * p
        torch.testing.assert_close(dict(target.named_parameters())[n], expected)


@pytest.mark.parametrize("name", ["hummingbird", "hummingbird++", "co2"])
def test_queue_receives_the_batch_after_the_loss(name, images):
    objective = make_objective(name)
    queue = objective.queue if name == "co2" else objective.memory
    before = queue.keys.clone()
    batch = make_batch(objective, images)
    objective(batch, 0.0)["loss"].backward()  # in-place update after autograd saved the memory
    pushed = 2 * batch.size if name == "co2" else batch.size
    changed = (queue.keys != before).any(dim=1)
    assert int(changed.sum()) == pushed and bool(changed[:pushed].all())
    assert int(queue.pointer) == pushed
    if name == "hummingbird++":
        assert queue.labels[: batch.size].tolist() == batch.labels.tolist()


def test_hummingbird_memory_keys_are_the_target_view_means(images):
    objective = make_objective("hummingbird")
    batch = make_batch(objective, images)
    with torch.no_grad():
        expected = torch.stack(
            [objective.target.backbone(v).patches.mean(dim=(1, 2)) for v in batch.views[:2]]
        ).mean(0)
        objective(batch, 0.0)
    torch.testing.assert_close(objective.memory.keys[: batch.size], expected)


def test_hummingbird_contextualisation_changes_the_loss(images):
    on = make_objective("hummingbird")
    off = make_objective("hummingbird", contextualize=False)
    batch = make_batch(on, images)
    assert off.memory is None and off.value_head is None
    with torch.no_grad():
        loss_on, loss_off = on(batch, 0.0)["loss"], off(batch, 0.0)["loss"]
    assert loss_on.item() != pytest.approx(loss_off.item(), rel=1e-4)
    no_mix = make_objective("hummingbird", mix=0.0)
    with torch.no_grad():
        torch.testing.assert_close(no_mix(batch, 0.0)["loss"], loss_off)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_hummingbird_pooling_ablations_train(pooling, images):
    objective = make_objective("hummingbird", pooling=pooling)
    assert objective.online.pool is None
    objective(make_batch(objective, images), 0.0)["loss"].backward()
    assert objective.online.psi.weight.grad is not None


def test_unknown_pooling_is_refused():
    with pytest.raises(ValueError, match="pooling must be one of"):
        make_objective("hummingbird", pooling="max")


def test_ibot_masked_patches_see_only_the_mask_token(images):
    objective = make_objective("ibot")
    backbone = objective.backbone.eval()
    x = torch.randn(2, 3, 32, 32)
    everything = torch.ones(2, 4, 4, dtype=torch.bool)
    with torch.no_grad():
        out = backbone(x, mask=everything, mask_token=objective.mask_token)
        plain = backbone(x)
    torch.testing.assert_close(out.patches[0], out.patches[1])  # content is gone
    assert not torch.allclose(plain.patches[0], plain.patches[1])


def test_ibot_exports_the_teacher_and_warms_its_temperature():
    objective = make_objective("ibot")
    assert objective.export_backbone() is objective.teacher.backbone
    cfg = objective.config
    assert objective.teacher_temperature(0.0) == pytest.approx(cfg.warmup_teacher_temperature)
    assert objective.teacher_temperature(cfg.teacher_temperature_warmup / 2) == pytest.approx(
        (cfg.warmup_teacher_temperature + cfg.teacher_temperature) / 2
    )
    assert objective.teacher_temperature(0.9) == pytest.approx(cfg.teacher_temperature)


def test_ibot_centres_are_the_ema_of_the_teacher_mean(images):
    """Wang's thesis, appendix E.1, Algorithm 1 (iBOT): C ← m·C + (1 − m)·mean of the teacher's
    [CLS] outputs over both global views, C' ← m'·C' + (1 − m')·mean over their patch tokens."""
    objective = make_objective("ibot")
    batch = make_batch(objective, images)
    g = torch.Generator().manual_seed(0)
    before_cls = torch.randn(objective.center_cls.shape, generator=g)
    before_patch = torch.randn(objective.center_patch.shape, generator=g)
    objective.center_cls.copy_(before_cls)
    objective.center_patch.copy_(before_patch)
    teacher = objective.teacher
    with torch.no_grad():
        outs = [teacher.backbone(v) for v in batch.views[:2]]  # the global views, unmasked
        t_cls = torch.cat([teacher.head(o.cls) for o in outs])  # (2B, K)
        t_patch = torch.cat([teacher.head(o.tokens) for o in outs])  # (2B, N, K)
        objective(batch, 0.0)
    m = objective.config.center_momentum
    torch.testing.assert_close(objective.center_cls, m * before_cls + (1 - m) * t_cls.mean(0))
    torch.testing.assert_close(
        objective.center_patch, m * before_patch + (1 - m) * t_patch.mean((0, 1))
    )


def test_ibot_views_carry_masks_of_the_patch_grid(images):
    objective = make_objective("ibot")
    batch = make_batch(objective, images, crop=32)
    assert len(batch.views) == 2 + objective.config.local_crops
    assert [tuple(m.shape) for m in batch.masks] == [(4, 4, 4), (4, 4, 4)]
    assert batch.views[2].shape[-1] % objective.backbone.patch_size == 0


def test_options_are_checked():
    with pytest.raises(ValueError, match="valid options"):
        make_objective("co2", not_an_option=1)
    from hbird.pretrain.hummingbird import HummingbirdConfig
    from hbird.pretrain.objective import config_from_options

    cfg = config_from_options(HummingbirdConfig, {"contextualize": "false", "mix": "0.3"})
    assert cfg.contextualize is False and cfg.mix == 0.3
