"""MaX-DeepLab's losses (thesis §4.3.2, eqs. 4.6-4.12; §4.3.4, eqs. 4.16-4.17), pinned.

The matching oracle is brute force over every injective assignment of masks to slots;
losses are recomputed from the equations with plain loops.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from hbird.panoptic.losses import (
    GroundTruthMasks,
    dice,
    ground_truth_masks,
    instance_discrimination,
    mask_id_cross_entropy,
    pq_style_loss,
)

pytest.importorskip("scipy")


def toy_target() -> GroundTruthMasks:
    """4 x 4: stuff class 0 on the left half, thing class 1 instances 1 and 2 on the
    right half's top and bottom rows 0-1 / 2-3; pixel (3, 0) is void."""
    semantic = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 1, 1], [255, 0, 1, 1]])
    instance = torch.tensor([[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 2, 2], [0, 0, 2, 2]])
    return ground_truth_masks(semantic, instance, thing_classes=(1,))


def test_ground_truth_masks_one_per_instance_and_stuff_class() -> None:
    t = toy_target()
    assert t.classes.tolist() == [0, 1, 1] and t.is_thing.tolist() == [False, True, True]
    assert t.masks.sum(dim=(1, 2)).tolist() == [7, 4, 4] and t.void.sum() == 1
    crowd = ground_truth_masks(
        torch.ones(2, 2, dtype=torch.int64), torch.zeros(2, 2, dtype=torch.int64), (1,)
    )
    assert len(crowd.masks) == 0 and bool(crowd.void.all())  # a crowd is void


def test_dice_with_smoothing_and_void() -> None:
    """gt (1, 1, 0, 0), pred (.5, .5, .5, 0): (2·1 + 1) / (2 + 1.5 + 1) = 2/3; with
    pixel 2 void: (2 + 1) / (2 + 1 + 1) = 3/4."""
    gt = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.0]])
    none = torch.zeros(4, dtype=torch.bool)
    assert dice(gt, pred, none).item() == pytest.approx(2 / 3)
    assert dice(gt, pred, torch.tensor([False, False, True, False])).item() == pytest.approx(3 / 4)


def perfect_prediction(target: GroundTruthMasks, n: int, num_classes: int = 2):
    k = len(target.classes)
    mask_logits = torch.zeros(n, 4, 4)
    mask_logits[:k] = 60.0 * target.masks
    class_logits = torch.full((n, num_classes + 1), -60.0)
    class_logits[torch.arange(k), target.classes] = 60.0
    class_logits[k:, -1] = 60.0
    return mask_logits, class_logits


def test_a_perfect_prediction_costs_nothing() -> None:
    target = toy_target()
    out = pq_style_loss(*perfect_prediction(target, n=6), target)
    assert out.positive.item() == pytest.approx(0.0, abs=1e-6)
    assert out.negative.item() == pytest.approx(0.0, abs=1e-6)
    assert sorted(zip(out.gt_index.tolist(), out.slot_index.tolist())) == [(0, 0), (1, 1), (2, 2)]


def oracle_loss(mask_logits, class_logits, target, alpha=0.75):
    """Eqs. 4.6-4.12 by loops: brute-force matching, then the sums."""
    n, k = mask_logits.shape[0], len(target.classes)
    masks = mask_logits.softmax(0)
    p = class_logits.softmax(-1)
    keep = ~target.void

    def dice_ij(i, j):
        g, q = target.masks[i][keep], masks[j][keep]
        return (2 * (g * q).sum() + 1) / (g.sum() + q.sum() + 1)

    sim = [[float(p[j, target.classes[i]] * dice_ij(i, j)) for j in range(n)] for i in range(k)]
    m = min(k, n)
    best = max(
        (
            (sum(sim[i][j] for i, j in zip(rows, cols)), rows, cols)
            for rows in itertools.combinations(range(k), m)
            for cols in itertools.permutations(range(n), m)
        ),
        key=lambda x: x[0],
    )
    _, rows, cols = best
    pos = sum(
        float(p[j, target.classes[i]]) * (1 - float(dice_ij(i, j)))
        + float(dice_ij(i, j)) * -math.log(float(p[j, target.classes[i]]))
        for i, j in zip(rows, cols)
    )
    neg = sum(-math.log(float(p[j, -1])) for j in range(n) if j not in cols)
    return (alpha * pos + (1 - alpha) * neg) / n, pos, neg


@pytest.mark.parametrize("n", [5, 2])  # more slots than masks (3), and fewer
def test_matches_the_brute_force_oracle(n: int) -> None:
    target = toy_target()
    gen = torch.Generator().manual_seed(n)
    mask_logits = torch.randn(n, 4, 4, generator=gen) * 2
    class_logits = torch.randn(n, 3, generator=gen)
    out = pq_style_loss(mask_logits, class_logits, target)
    loss, pos, neg = oracle_loss(mask_logits, class_logits, target)
    assert out.loss.item() == pytest.approx(loss, rel=1e-5)
    assert out.positive.item() == pytest.approx(pos, rel=1e-5)
    assert out.negative.item() == pytest.approx(neg, rel=1e-5, abs=1e-7)
    assert len(out.slot_index) == min(n, 3)


def test_permuting_the_slots_leaves_the_loss_unchanged() -> None:
    target = toy_target()
    gen = torch.Generator().manual_seed(0)
    mask_logits, class_logits = (
        torch.randn(6, 4, 4, generator=gen),
        torch.randn(6, 3, generator=gen),
    )
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    a = pq_style_loss(mask_logits, class_logits, target)
    b = pq_style_loss(mask_logits[perm], class_logits[perm], target)
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    pairs_a = set(zip(a.gt_index.tolist(), a.slot_index.tolist()))
    pairs_b = set(zip(b.gt_index.tolist(), perm[b.slot_index].tolist()))  # original slots
    assert pairs_a == pairs_b


def test_stop_gradients_of_l_pos() -> None:
    """∂L_pos/∂class logits = ∂/∂ of Σ Dice[sg] · (-log p̂): the p̂ weight passes none."""
    target = toy_target()
    gen = torch.Generator().manual_seed(1)
    mask_logits = torch.randn(4, 4, 4, generator=gen)
    class_logits = torch.randn(4, 3, generator=gen, requires_grad=True)
    out = pq_style_loss(mask_logits, class_logits, target)
    (grad,) = torch.autograd.grad(out.positive, class_logits)
    d = dice(target.masks, mask_logits.softmax(0), target.void)
    log_p = class_logits.log_softmax(-1)
    expected = sum(
        d[i, j] * -log_p[j, target.classes[i]] for i, j in zip(out.gt_index, out.slot_index)
    )
    (want,) = torch.autograd.grad(expected, class_logits)
    assert torch.allclose(grad, want, atol=1e-6)


def test_instance_discrimination_on_hand_tensors() -> None:
    """Pixels a, b in mask 1 with g = (1, 0), (0.6, 0.8); pixel c in mask 2 with (0, 1).
    t1 = normalise((1.6, 0.8)), t2 = (0, 1); each pixel's loss is
    -log(exp(t_own·g/τ) / Σ_i exp(t_i·g/τ)), τ = 0.3, mean over the three."""
    g = torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]).view(2, 1, 3)
    masks = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]])
    target = GroundTruthMasks(
        masks, torch.tensor([1, 1]), torch.tensor([True, True]), torch.zeros(1, 3, dtype=torch.bool)
    )
    norm = math.hypot(1.6, 0.8)
    t1, t2 = (1.6 / norm, 0.8 / norm), (0.0, 1.0)
    pixels = [((1.0, 0.0), 0), ((0.6, 0.8), 0), ((0.0, 1.0), 1)]
    losses = []
    for gp, own in pixels:
        s = [(t[0] * gp[0] + t[1] * gp[1]) / 0.3 for t in (t1, t2)]
        losses.append(-(s[own] - math.log(math.exp(s[0]) + math.exp(s[1]))))
    assert instance_discrimination(g, target).item() == pytest.approx(sum(losses) / 3, rel=1e-6)
    stuff_only = GroundTruthMasks(
        masks, torch.tensor([0, 0]), torch.tensor([False, False]), target.void
    )
    assert instance_discrimination(g, stuff_only).item() == 0.0  # thing pixels only


def test_mask_id_cross_entropy_on_hand_tensors() -> None:
    """Mask 0 (pixel 0) matched to slot 1, mask 1 (pixel 1) to slot 0, pixel 2 void:
    mean of -log softmax(logits[:, 0])[1] and -log softmax(logits[:, 1])[0]."""
    logits = torch.tensor([[[0.0, 2.0, 5.0]], [[1.0, 0.0, -5.0]]])  # (N=2, 1, 3)
    masks = torch.tensor([[[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]]])
    void = torch.tensor([[False, False, True]])
    target = GroundTruthMasks(masks, torch.tensor([0, 1]), torch.tensor([False, True]), void)
    got = mask_id_cross_entropy(logits, target, torch.tensor([0, 1]), torch.tensor([1, 0]))
    first = -(1.0 - math.log(math.exp(0.0) + math.exp(1.0)))
    second = -(2.0 - math.log(math.exp(2.0) + math.exp(0.0)))
    assert got.item() == pytest.approx((first + second) / 2, rel=1e-6)


def test_float64_predictions_are_scored_in_float64() -> None:
    """ground_truth_masks builds float32 masks; float64 predictions (a float64 training
    run) are scored in float64 (the Dice and instance-discrimination products mixed the
    two dtypes and failed), with the values the float32 computation gives."""
    target = toy_target()
    gen = torch.Generator().manual_seed(0)
    inputs64 = {
        "mask_logits": torch.randn(5, 4, 4, generator=gen, dtype=torch.float64),
        "class_logits": torch.randn(5, 3, generator=gen, dtype=torch.float64),
        "features": torch.randn(8, 4, 4, generator=gen, dtype=torch.float64),
    }
    results = {}
    for dtype in (torch.float64, torch.float32):
        x = {k: v.to(dtype) for k, v in inputs64.items()}
        pq = pq_style_loss(x["mask_logits"], x["class_logits"], target)
        results[dtype] = {
            "pq": pq.loss,
            "dice": dice(target.masks, x["mask_logits"].softmax(0), target.void),
            "instance_discrimination": instance_discrimination(x["features"], target),
            "mask_id": mask_id_cross_entropy(x["mask_logits"], target, pq.gt_index, pq.slot_index),
        }
    for key, value in results[torch.float64].items():
        assert value.dtype == torch.float64, key
        want = results[torch.float32][key].double()
        torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
