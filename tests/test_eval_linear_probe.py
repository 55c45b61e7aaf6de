"""Linear-probe baseline: training, prediction, scoring, reports and the comparison table."""

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from hbird.data.synthetic import write_scene_folder
from hbird.errors import InputError
from hbird.eval import evaluate
from hbird.eval.linear_probe import (
    LinearHead,
    PatchTable,
    ProbeSettings,
    compare_reports,
    learning_rate,
    linear_probe,
    predict_linear,
    train_linear_head,
)
from hbird.labelspec import LabelSpec
from hbird.metrics import DepthMetrics

FAST = dict(layers=0, image_size=64, batch_size=4, overlays=0)
RETRIEVAL = dict(FAST, k=10, temperature=0.05, memory_size=None, aug_epochs=1, index="exact")
PROBE = dict(epochs=5, lr=0.1, patch_batch_size=128)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, scenes):
    """A synthetic folder dataset, and the same with the prompt masks shuffled between images."""
    prompt, queries = scenes
    root = tmp_path_factory.mktemp("ds")
    write_scene_folder(root / "train", prompt)
    write_scene_folder(root / "val", queries, prefix="val")
    perm = torch.randperm(len(prompt), generator=torch.Generator().manual_seed(0)).tolist()
    assert all(i != j for i, j in enumerate(perm[:3]))
    shuffled = [dataclasses.replace(s, mask=prompt[j].mask) for s, j in zip(prompt, perm)]
    wrong = tmp_path_factory.mktemp("shuffled")
    write_scene_folder(wrong / "train", shuffled)
    write_scene_folder(wrong / "val", queries, prefix="val")
    return f"folder:root={root}:task=segmentation", f"folder:root={wrong}:task=segmentation"


def test_probe_learns_and_shuffled_labels_collapse(folders):
    right, wrong = folders
    good = linear_probe("test_vit", right, progress=False, **PROBE, **FAST)
    bad = linear_probe("test_vit", wrong, progress=False, **PROBE, **FAST)
    assert good.metrics["miou"] > 0.7  # chance with 4 classes is ≈ 0.25 at best
    assert bad.metrics["miou"] < 0.3
    losses = good.metrics["train_loss_per_epoch"]
    assert len(losses) == PROBE["epochs"] and losses[-1] < 0.6 * losses[0]
    assert all(b <= a + 1e-6 for a, b in zip(losses, losses[1:]))
    assert good.counts["train_patches"] == 20 * 8 * 10  # 64x80 → 8x10 patches, none fully ignored
    assert good.counts["cache_bytes"] == 1600 * (32 * 2 + 4 * 4 + 8)


def test_same_seed_same_numbers_other_seed_other_order(folders):
    right, _ = folders
    a = linear_probe("test_vit", right, progress=False, seed=3, **PROBE, **FAST)
    b = linear_probe("test_vit", right, progress=False, seed=3, **PROBE, **FAST)
    c = linear_probe("test_vit", right, progress=False, seed=4, **PROBE, **FAST)
    assert a.metrics == b.metrics
    assert a.metrics["train_loss_per_epoch"] != c.metrics["train_loss_per_epoch"]


def test_run_folder_and_comparison_table(tmp_path, folders):
    right, _ = folders
    out = tmp_path / "linear"
    linear = linear_probe(
        "test_vit", right, out=out, progress=False, **PROBE, **dict(FAST, overlays=2)
    )
    for name in (
        "config.json",
        "metrics.json",
        "per_class.csv",
        "summary.md",
        "linear_head.safetensors",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "pictures").glob("*.png"))) == 2
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["miou"] == pytest.approx(linear.metrics["miou"])
    assert (
        saved["config"]["linear_probe"]["epochs"] == 5 and saved["config"]["protocol"] == "linear"
    )
    summary = (out / "summary.md").read_text()
    assert (
        summary.startswith("# Linear probe: test_vit")
        and "| miou |" in summary
        and "k =" not in summary
    )

    retrieval = evaluate(
        "test_vit",
        right,
        progress=False,
        **RETRIEVAL,
    )
    table = compare_reports({"retrieval": retrieval, "linear probe": linear}).splitlines()
    assert table[0] == (
        "| method | miou | pixel_accuracy | mean_class_accuracy | prompt images | set-up s "
        "| s / query |"
    )
    assert table[2].startswith(f"| retrieval | {retrieval.metrics['miou']:.4f} |")
    assert table[3].startswith(f"| linear probe | {linear.metrics['miou']:.4f} |")
    depth = evaluate(
        "test_vit",
        right.replace("segmentation", "depth"),
        progress=False,
        max_queries=1,
        **{**RETRIEVAL, "temperature": 0.02},
    )
    with pytest.raises(ValueError, match="different tasks"):
        compare_reports({"a": retrieval, "b": depth})


def test_depth_probe_beats_the_mean_depth(folders, scenes):
    right, _ = folders
    spec = right.replace("segmentation", "depth")
    report = linear_probe("test_vit", spec, progress=False, **dict(PROBE, epochs=10), **FAST)
    prompt, queries = scenes
    mean_depth = float(torch.cat([s.depth.flatten() for s in prompt]).mean())
    constant = DepthMetrics()  # the protocol's range for depth without a declared one: 1e-3 .. 10 m
    for s in queries:
        constant.update(torch.full_like(s.depth, mean_depth), s.depth)
    assert report.task == "depth" and math.isfinite(report.metrics["rmse"])
    assert report.metrics["rmse"] < 0.9 * constant.compute().rmse


def test_soft_targets_and_schedule_oracles():
    # two well-separated clusters, one class each, with soft targets: accuracy must be perfect
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(64, 8, generator=gen) + 3, torch.randn(64, 8, generator=gen) - 3])
    targets = torch.cat(
        [torch.tensor([[0.9, 0.1]]).repeat(64, 1), torch.tensor([[0.2, 0.8]]).repeat(64, 1)]
    )
    table = PatchTable(x, targets, torch.arange(128) // 8, torch.ones(16, dtype=torch.float64))
    spec = LabelSpec(task="segmentation", num_classes=2)
    head, losses = train_linear_head(
        table, spec, ProbeSettings(epochs=20, lr=0.1, patch_batch_size=16), False
    )
    assert (head(x).argmax(1) == targets.argmax(1)).all()
    # the soft-target optimum is the targets' own entropy; training gets close to it
    entropy = float(-(targets * targets.log()).sum(1).mean())
    assert entropy <= losses[-1] < entropy + 0.05
    assert PatchTable.select(table, [0, 15]).image_index.unique().tolist() == [0, 15]

    s = ProbeSettings(epochs=4, lr=0.2, schedule="cosine")
    assert learning_rate(s, 0, 10) == pytest.approx(0.2)
    assert learning_rate(s, 20, 10) == pytest.approx(0.1)
    step = dataclasses.replace(s, schedule="step")
    assert [learning_rate(step, e * 10, 10) for e in range(4)] == pytest.approx(
        [0.2, 0.2, 0.02, 0.002]
    )
    with pytest.raises(InputError, match="schedule"):
        ProbeSettings(schedule="linear").validate()


def test_prediction_upsamples_logits_then_argmax():
    gen = torch.Generator().manual_seed(1)
    mean, std = torch.zeros(4), torch.ones(4)
    head = LinearHead(mean, std, 3)
    with torch.no_grad():
        head.linear.weight.copy_(torch.randn(3, 4, generator=gen))
    feats = torch.randn(2, 3, 4, generator=gen)  # (h, w, D)
    pred = predict_linear(head, feats, (13, 17), LabelSpec(task="segmentation", num_classes=3))
    logits = (feats @ head.linear.weight.T).permute(2, 0, 1)[None]
    oracle = F.interpolate(logits, size=(13, 17), mode="bilinear", align_corners=False)[0].argmax(0)
    assert pred.labels.shape == (13, 17) and torch.equal(pred.labels, oracle)
