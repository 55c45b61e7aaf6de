"""A specialist trained on W processes with B / W images each is the one-process run on B.

Two things make it so (hbird.panoptic.training): every batch norm takes its training
statistics over the global batch (hbird.pretrain.backbone.globalize_norms), and every
loss term is a per-image value averaged over the images (deeplab2's per-sample losses),
so DDP's average of the processes' gradients is the one-process gradient.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hbird.data.panoptic_synthetic import SyntheticPanopticDataset
from hbird.panoptic.specialist import PanopticTarget, builtin_specialists, create_specialist
from hbird.panoptic.training import MODEL_NAME, SpecialistConfig, SpecialistTrainer
from hbird.pretrain.backbone import GLOBAL_NORMS, globalize_norms, local_norms

pytest.importorskip("scipy")
pytest.importorskip("timm")

TINY = {
    "panoptic-deeplab": {"backbone": "test_axial", "decoder_width": 0.25},
    "max-deeplab": {"preset": "tiny"},
}
"""CPU-sized options of every specialist (the tests walk the registry)."""
NAMES = sorted(TINY)


def test_every_specialist_is_walked():
    assert sorted(builtin_specialists()) == NAMES


def tiny(name: str, dtype=torch.float64):
    torch.manual_seed(0)
    return create_specialist(name, 4, (1, 2, 3), **TINY[name]).to(dtype)


def scene_batch(count: int, size: int = 32, dtype=torch.float64):
    """``count`` synthetic panoptic scenes: images ``(count, 3, size, size)``, targets."""
    scenes = SyntheticPanopticDataset(n=count, seed=3, size=size)
    images = torch.stack([s.image for s in scenes]).to(dtype)
    return images, [PanopticTarget(s.label.long(), s.instance.long()) for s in scenes]


@pytest.mark.parametrize("name", NAMES)
def test_every_norm_of_both_specialists_becomes_global(name):
    """Every batch norm of the model (backbone, dual-path blocks, MaX-DeepLab's memory
    and mask norms, decoders, heads) is replaced by a global-batch one; the state dict
    keeps its keys, so checkpoints load either way."""
    plain = tiny(name)
    norms = [m for m in plain.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert local_norms(plain)  # the plain model has local norms, so the check can fail
    ours = globalize_norms(copy.deepcopy(plain))
    assert local_norms(ours) == []
    converted = [m for m in ours.modules() if isinstance(m, GLOBAL_NORMS)]
    assert len(converted) == len(norms)
    assert ours.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("name", NAMES)
def test_forced_distributed_path_equals_the_plain_computation(name, monkeypatch):
    """The global norms' DDP path (Σx, Σx², counts through a differentiable all-reduce),
    forced in one process where the all-reduce is the identity: outputs, losses,
    gradients and running statistics equal the plain model's (float64)."""
    import torch.distributed as dist

    import hbird.pretrain.backbone as backbone_module
    import hbird.pretrain.distributed as distributed_module

    images, targets = scene_batch(2)
    plain = tiny(name).train()
    ours = globalize_norms(copy.deepcopy(plain)).train()
    want = plain.loss(plain(plain.normalize(images)), targets)
    want["loss"].backward()

    calls = []
    monkeypatch.setattr(distributed_module, "is_distributed", lambda: True)
    monkeypatch.setattr(backbone_module, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *a, **k: calls.append(tensor.shape))
    got = ours.loss(ours(ours.normalize(images)), targets)
    got["loss"].backward()

    norms = [m for m in ours.modules() if isinstance(m, GLOBAL_NORMS)]
    assert len(calls) >= 2 * len(norms)  # forward and backward of every norm at least once
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-10, atol=1e-12, msg=key)
    plain_params = dict(plain.named_parameters())
    for key, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, plain_params[key].grad, rtol=1e-8, atol=1e-10, msg=key)
    plain_state = plain.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(value, plain_state[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.mark.parametrize("name", NAMES)
def test_the_batch_loss_is_the_mean_of_the_images_losses(name):
    """Per-image normalisation: with the norms in eval mode (images independent), the
    loss of a batch of 4 is the mean of the 4 single-image losses (a naive loop), so
    two processes with 2 images each average to the one-process loss."""
    images, targets = scene_batch(4)
    model = tiny(name).eval()
    with torch.no_grad():
        outputs = model(model.normalize(images))
        batch = model.loss(outputs, targets)
        single = [
            model.loss({k: v[i : i + 1] for k, v in outputs.items()}, targets[i : i + 1])
            for i in range(4)
        ]
    for key in batch:
        oracle = sum(s[key] for s in single) / 4
        torch.testing.assert_close(batch[key], oracle, rtol=1e-12, atol=1e-12, msg=key)
    # the images differ, so a pooled normalisation would give another number
    assert len({round(float(s["loss"]), 6) for s in single}) > 1


# -- two CPU processes (gloo) against one ------------------------------------------------------

STEPS = 2
RUN = {"steps": STEPS, "batch_size": 4, "crop_size": 32, "num_workers": 0, "log_every": 1}
"""Two steps on a global batch of 4 32-px crops (2 images per process), every step logged."""


def run_specialist(root: Path, name: str, dist=None) -> None:
    """:data:`RUN` of ``name`` in float64 (test_pretrain_ddp.default_float64)."""
    from test_pretrain_ddp import default_float64

    with default_float64():
        config = SpecialistConfig(
            specialist=name, specialist_options=TINY[name], out=str(root / name), **RUN
        )
        scenes = SyntheticPanopticDataset(n=8, seed=3, size=32)
        SpecialistTrainer(config, dist=dist, dataset=scenes, log=lambda _: None).fit()


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_two_processes_match_one_process(tmp_path, name):
    """Every logged loss term and the gradient norm of both steps, and the parameters
    after 2 steps, equal the one-process run on the same global batch."""
    from test_pretrain_ddp import check_same_run, run_in_two_processes

    run_specialist(tmp_path / "single", name)
    run_in_two_processes(tmp_path / "init", run_specialist, tmp_path / "double", name)
    check_same_run(tmp_path, name, weights=MODEL_NAME, steps=STEPS)
    first = json.loads((tmp_path / "double" / name / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and {"loss", "grad_norm"} <= first.keys()
    saved = load_file(str(tmp_path / "double" / name / MODEL_NAME))
    assert all(v.dtype == torch.float64 for v in saved.values() if v.is_floating_point())
