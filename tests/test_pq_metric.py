"""Panoptic quality (Kirillov et al. 2019; the rules of issue 13), pinned by hand.

Every case is a 4x4 image; class 0 is stuff, classes 1 and 2 are things, 255 is void.
Expected values are worked out in the comments from the definitions:
IoU = |p ∩ g| / (|p| + |g| - |p ∩ g| - |p ∩ void|), PQ_c = Σ IoU / (TP + FP/2 + FN/2),
SQ_c = Σ IoU / TP, RQ_c = TP / (TP + FP/2 + FN/2).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hbird.errors import InputError
from hbird.metrics import PanopticQuality

V = 255


def pan(semantic, instance):
    return torch.tensor(semantic, dtype=torch.int64), torch.tensor(instance, dtype=torch.int64)


STUFF = [[0] * 4] * 3  # rows 1..3 of stuff class 0, no instance
ZERO = [[0] * 4] * 3


def scored(pred, target, num_classes=3, things=(1, 2)):
    metric = PanopticQuality(num_classes, thing_classes=things)
    metric.update(pan(*pred), pan(*target))
    return metric, metric.compute()


def test_perfect_match_with_other_instance_ids() -> None:
    target = ([[1, 1, 2, 2], *STUFF], [[1, 2, 1, 1], *ZERO])
    pred = ([[1, 1, 2, 2], *STUFF], [[7, 5, 9, 9], *ZERO])
    metric, s = scored(pred, target)
    assert metric.tp.tolist() == [1, 2, 1] and metric.fp.sum() == 0 and metric.fn.sum() == 0
    assert (s.pq, s.sq, s.rq, s.pq_th, s.pq_st) == (1.0, 1.0, 1.0, 1.0, 1.0)


def test_split() -> None:
    """GT thing (4 px) predicted as 3 px + 1 px: IoU 3/4 → TP, the 1 px piece → FP.
    Class 1: PQ = 0.75 / 1.5 = 0.5, SQ = 0.75, RQ = 2/3; stuff perfect."""
    target = ([[1, 1, 1, 1], *STUFF], [[1, 1, 1, 1], *ZERO])
    pred = ([[1, 1, 1, 1], *STUFF], [[1, 1, 1, 2], *ZERO])
    metric, s = scored(pred, target)
    assert (metric.tp[1], metric.fp[1], metric.fn[1]) == (1, 1, 0)
    assert s.per_class_pq[1] == pytest.approx(0.5)
    assert s.per_class_sq[1] == pytest.approx(0.75)
    assert s.per_class_rq[1] == pytest.approx(2 / 3)
    assert s.pq == pytest.approx((0.5 + 1.0) / 2) and s.pq_th == pytest.approx(0.5)
    assert math.isnan(s.per_class_pq[2])  # class 2 absent from both: not counted


def test_merge() -> None:
    """GT instances of 3 px and 1 px predicted as one 4 px instance: IoU 3/4 → TP;
    IoU 1/4 → the small one is a FN. Class 1: PQ = 0.75 / 1.5."""
    target = ([[1, 1, 1, 1], *STUFF], [[1, 1, 1, 2], *ZERO])
    pred = ([[1, 1, 1, 1], *STUFF], [[4, 4, 4, 4], *ZERO])
    metric, s = scored(pred, target)
    assert (metric.tp[1], metric.fp[1], metric.fn[1]) == (1, 0, 1)
    assert s.per_class_pq[1] == pytest.approx(0.5)


def test_iou_of_exactly_one_half_is_not_a_match() -> None:
    """Thing: 2 px predicted of 4: IoU = 2 / (2 + 4 - 2) = 0.5 → FN and FP, PQ 0.
    Stuff: predicted 14 px over 12: IoU 12/14 → TP."""
    target = ([[1, 1, 1, 1], *STUFF], [[1, 1, 1, 1], *ZERO])
    pred = ([[1, 1, 0, 0], *STUFF], [[1, 1, 0, 0], *ZERO])
    metric, s = scored(pred, target)
    assert (metric.tp[1], metric.fp[1], metric.fn[1]) == (0, 1, 1)
    assert (s.per_class_pq[1], s.per_class_sq[1], s.per_class_rq[1]) == (0.0, 0.0, 0.0)
    assert s.per_class_pq[0] == pytest.approx(12 / 14)
    assert s.pq == pytest.approx((12 / 14 + 0.0) / 2)


def test_predicted_pixels_on_void_leave_the_union() -> None:
    """GT thing = row 1 under a void row 0; prediction = rows 0-1 (8 px). Without the
    void rule the IoU would be 4/8 (no match); with it 4 / (8 + 4 - 4 - 4) = 1."""
    target = ([[V] * 4, [1] * 4, [0] * 4, [0] * 4], [[0] * 4, [1] * 4, [0] * 4, [0] * 4])
    pred = ([[1] * 4, [1] * 4, [0] * 4, [0] * 4], [[1] * 4, [1] * 4, [0] * 4, [0] * 4])
    metric, s = scored(pred, target)
    assert metric.tp[1] == 1 and metric.iou_sum[1] == 1.0 and s.pq == 1.0


def test_void_overlap_saves_a_false_positive() -> None:
    """A 4 px prediction 3/4 on void is no FP; class 1 is then absent (not counted) and
    stuff has IoU 11/12. At exactly 1/2 void it is a FP."""
    target = ([[V] * 4, *STUFF], [[0] * 4, *ZERO])
    pred = ([[1, 1, 1, 0], [1, 0, 0, 0], [0] * 4, [0] * 4], [[1, 1, 1, 0], [1, 0, 0, 0], *ZERO[:2]])
    metric, s = scored(pred, target)
    assert metric.fp[1] == 0 and math.isnan(s.per_class_pq[1])
    assert s.pq == pytest.approx(11 / 12) and math.isnan(s.pq_th)
    half = ([[V, V, 0, 0], *STUFF], [[0] * 4, *ZERO])
    pred = ([[1] * 4, *STUFF], [[1] * 4, *ZERO])
    metric, s = scored(pred, half)
    assert metric.fp[1] == 1 and s.per_class_pq[1] == 0.0


def test_crowd_regions() -> None:
    """A thing crowd (instance 0) is never a FN; a same-class prediction mostly on it is
    no FP; one of another class, or only half on it, is."""
    target = ([[1] * 4, *STUFF], [[0] * 4, *ZERO])  # row 0: a crowd of class 1
    on_crowd = ([[1] * 4, *STUFF], [[3] * 4, *ZERO])
    metric, s = scored(on_crowd, target)
    assert (metric.tp[1], metric.fp[1], metric.fn[1]) == (0, 0, 0)
    assert math.isnan(s.per_class_pq[1]) and s.pq == 1.0
    other_class = ([[2] * 4, *STUFF], [[3] * 4, *ZERO])
    metric, _ = scored(other_class, target)
    assert metric.fp[2] == 1 and metric.fn[1] == 0
    half = ([[1, 1, 1, 1], [1, 1, 0, 0], [0] * 4, [0] * 4], [[3] * 4, [3, 3, 0, 0], *ZERO[:2]])
    target = ([[1, 1, 0, 0], *STUFF], [[0, 0, 0, 0], *ZERO])  # crowd 2 px, stuff 14 px
    half = ([[1, 1, 1, 1], *STUFF], [[3] * 4, *ZERO])  # 4 px, 2 on the crowd: 50% → FP
    metric, _ = scored(half, target)
    assert metric.fp[1] == 1


def test_classes_absent_from_both_are_left_out() -> None:
    target = ([[1, 1, 1, 1], *STUFF], [[1] * 4, *ZERO])
    metric, s = scored(target, target, num_classes=6, things=(1, 2, 4))
    assert [math.isnan(v) for v in s.per_class_pq] == [False, False, True, True, True, True]
    assert s.pq == 1.0 and s.pq_st == 1.0 and s.pq_th == 1.0


def test_stuff_instance_ids_are_ignored() -> None:
    target = ([[0] * 4, *STUFF], [[0] * 4, *ZERO])
    pred = ([[0] * 4, *STUFF], [[1, 2, 3, 4], *ZERO])
    metric, s = scored(pred, target)
    assert metric.tp[0] == 1 and metric.fp.sum() == 0 and s.pq == 1.0


def random_pair(rng: np.random.Generator, void: bool):
    """Blocky random panoptic maps: classes 0-1 stuff, 2-4 things with 1-3 instances."""
    coarse = rng.integers(0, 5, (4, 4))
    semantic = np.kron(coarse, np.ones((4, 4), np.int64))
    instance = np.where(semantic >= 2, rng.integers(1, 4, semantic.shape), 0)
    instance = np.kron(instance[::4, ::4], np.ones((4, 4), np.int64))
    changed = rng.uniform(size=(4, 4)) < 0.3  # whole blocks relabelled: FNs and FPs
    block = lambda x: np.kron(x, np.ones((4, 4), np.int64))  # noqa: E731
    pred_sem = np.where(block(changed), block(rng.integers(0, 5, (4, 4))), semantic)
    flip = rng.uniform(size=semantic.shape) < 0.1  # and pixel noise: IoUs below 1
    pred_sem[flip] = rng.integers(0, 5, flip.sum())
    pred_inst = np.where(block(changed) | flip, rng.integers(1, 4, semantic.shape), instance)
    pred_inst = np.where(pred_sem >= 2, np.maximum(pred_inst, 1), 0)
    if void:
        semantic[rng.uniform(size=semantic.shape) < 0.1] = V
        instance[semantic == V] = 0
    return (pred_sem, pred_inst), (semantic, instance)


def test_agrees_with_torchmetrics_on_random_maps() -> None:
    """Independent implementation: torchmetrics' PanopticQuality, under the conventions
    both share (no predicted void, no crowd; ground-truth void allowed). It sums IoUs in
    float32, hence the tolerance."""
    torchmetrics = pytest.importorskip("torchmetrics.detection")
    rng = np.random.default_rng(0)
    ours = PanopticQuality(5, thing_classes=(2, 3, 4))
    theirs = torchmetrics.PanopticQuality(
        things={2, 3, 4}, stuffs={0, 1}, return_sq_and_rq=True, return_per_class=True
    )
    for i in range(12):
        (ps, pi), (ts, ti) = random_pair(rng, void=i % 2 == 0)
        ours.update(
            (torch.from_numpy(ps), torch.from_numpy(pi)),
            (torch.from_numpy(ts), torch.from_numpy(ti)),
        )
        stack = lambda s, n: torch.from_numpy(np.stack([s, n], -1))[None]  # noqa: E731
        theirs.update(stack(ps, pi), stack(ts, ti))
    per_class = theirs.compute().reshape(-1, 3)  # rows: things 2, 3, 4 then stuffs 0, 1
    order = [2, 3, 4, 0, 1]
    s = ours.compute()
    for row, c in zip(per_class.tolist(), order):
        assert s.per_class_pq[c] == pytest.approx(row[0], rel=1e-6)
        assert s.per_class_sq[c] == pytest.approx(row[1], rel=1e-6)
        assert s.per_class_rq[c] == pytest.approx(row[2], rel=1e-6)
    assert ours.tp.sum() > 5 and ours.fp.sum() > 0 and ours.fn.sum() > 0  # a real test


def test_state_round_trip_and_merge() -> None:
    rng = np.random.default_rng(1)
    pairs = [random_pair(rng, void=True) for _ in range(4)]
    as_t = lambda p: tuple(torch.from_numpy(x) for x in p)  # noqa: E731
    whole = PanopticQuality(5, thing_classes=(2, 3, 4))
    first, second = PanopticQuality(5, (2, 3, 4)), PanopticQuality(5, (2, 3, 4))
    for i, (pred, target) in enumerate(pairs):
        whole.update(as_t(pred), as_t(target))
        (first if i < 2 else second).update(as_t(pred), as_t(target))
    restored = PanopticQuality(5, (2, 3, 4))
    state = {
        k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in first.state_dict().items()
    }
    restored.load_state_dict(json.loads(json.dumps(state)))
    restored.merge(second)
    for name in ("tp", "fp", "fn"):
        assert torch.equal(getattr(restored, name), getattr(whole, name))
    assert torch.allclose(restored.iou_sum, whole.iou_sum, rtol=1e-12)  # sums in another order
    with pytest.raises(ValueError, match="thing_classes"):
        PanopticQuality(5, (2, 3)).load_state_dict(state)


def test_bad_inputs_are_named() -> None:
    metric = PanopticQuality(3, (1,))
    with pytest.raises(InputError, match="outside 0..2"):
        metric.update(pan([[5]], [[0]]), pan([[0]], [[0]]))
    with pytest.raises(InputError, match="pair"):
        metric.update(torch.zeros(3, 2, 2, dtype=torch.int64), pan([[0]], [[0]]))
