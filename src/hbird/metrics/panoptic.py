"""Streaming panoptic quality (Kirillov et al., CVPR 2019), mergeable like ``ConfusionMatrix``.

A labelling is a ``(semantic, instance)`` pair of ``(H, W)`` int maps
(:class:`hbird.data.panoptic.PanopticMap`). A segment is the set of pixels of one
``(class, instance)``; a stuff class is one segment per image whatever its instance ids;
a ground-truth thing pixel with instance 0 is a *crowd* region of its class; a pixel whose
semantic id is ``ignore_index`` is void (in the prediction: left unlabelled).

Per image, the rules:

* a predicted and a ground-truth segment of the same class match when their IoU > 0.5
  (so at most one match each); predicted pixels on ground-truth void are left out of
  the union: ``union = |p| + |g| - |p ∩ g| - |p ∩ void|``;
* a matched pair is a TP and adds its IoU; a ground-truth segment left unmatched is a
  FN, except crowd regions (void is no segment, so never a FN either);
* a predicted segment left unmatched is a FP unless more than 50% of it lies on void, or
  more than 50% of it on a crowd region of its own class.

Scores, from the sums per class: ``PQ_c = Σ_TP IoU / (TP + ½FP + ½FN)``,
``SQ_c = Σ_TP IoU / TP`` (0 without a TP), ``RQ_c = TP / (TP + ½FP + ½FN)``; PQ, SQ and
RQ average them over the classes with ``TP + FP + FN > 0``, PQ^Th / PQ^St over those of
the thing / stuff classes.

Conventions elsewhere: the COCO ``panopticapi`` adds the void and the crowd parts of an
unmatched prediction and tests their sum against 50%, where the rule above tests each
part alone (the rule of issue 13). ``torchmetrics``' ``PanopticQuality`` has no crowd,
also leaves ground-truth pixels *predicted* void out of the union, and does not count a
ground-truth segment more than half predicted void as a FN; with predictions that have
no void and targets without crowds, all three agree (tests/test_pq_metric.py checks it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hbird.errors import InputError

MATCH_IOU = 0.5
"""A pair matches when its IoU is strictly above this."""
EXCUSED_FRACTION = 0.5
"""An unmatched prediction more than this much void (or same-class crowd) is not a FP."""


@dataclass(frozen=True)
class PanopticScores:
    """Scores from the sums of a :class:`PanopticQuality`.

    Attributes:
        pq, sq, rq: means over the counted classes (``TP + FP + FN > 0``); NaN if none.
        pq_th, sq_th, rq_th / pq_st, sq_st, rq_st: the same over thing / stuff classes.
        per_class_pq, per_class_sq, per_class_rq: NaN for a class not counted.
        tp, fp, fn: counts per class.
        thing_classes, class_names: as given to the metric.
    """

    pq: float
    sq: float
    rq: float
    pq_th: float
    sq_th: float
    rq_th: float
    pq_st: float
    sq_st: float
    rq_st: float
    per_class_pq: tuple[float, ...]
    per_class_sq: tuple[float, ...]
    per_class_rq: tuple[float, ...]
    tp: tuple[int, ...]
    fp: tuple[int, ...]
    fn: tuple[int, ...]
    thing_classes: tuple[int, ...]
    class_names: tuple[str, ...] | None = None

    @property
    def headline(self) -> dict[str, float]:
        keys = ("pq", "pq_th", "pq_st", "sq", "rq", "sq_th", "rq_th", "sq_st", "rq_st")
        return {k: getattr(self, k) for k in keys}

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: ``class``, ``kind`` (thing/stuff), ``pq``, ``sq``, ``rq``, counts."""
        names = self.class_names or tuple(str(i) for i in range(len(self.tp)))
        things = set(self.thing_classes)
        return [
            {
                "class": names[c],
                "kind": "thing" if c in things else "stuff",
                "pq": _none(self.per_class_pq[c]),
                "sq": _none(self.per_class_sq[c]),
                "rq": _none(self.per_class_rq[c]),
                "tp": self.tp[c],
                "fp": self.fp[c],
                "fn": self.fn[c],
            }
            for c in range(len(self.tp))
        ]

    def to_dict(self) -> dict[str, Any]:
        return {**{k: _none(v) for k, v in self.headline.items()}, "per_class": self.per_class()}


def _none(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


def _pair(labelling: Any, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``(semantic, instance)`` flattened int64 arrays of a labelling."""
    try:
        semantic, instance = labelling
    except (TypeError, ValueError):
        raise InputError(
            f"{what} must be a (semantic, instance) pair of (H, W) maps "
            "(hbird.data.panoptic.PanopticMap)"
        ) from None
    out = []
    for x, name in ((semantic, "semantic"), (instance, "instance")):
        t = torch.as_tensor(x)
        if t.is_floating_point() or t.dtype == torch.bool:
            raise InputError(f"{what} {name} map must hold integer ids, got {t.dtype}")
        out.append(t.detach().cpu().reshape(-1).numpy().astype(np.int64))
    if tuple(torch.as_tensor(semantic).shape) != tuple(torch.as_tensor(instance).shape):
        raise InputError(f"{what}: the semantic and instance maps differ in shape")
    return out[0], out[1]


class PanopticQuality:
    """Streaming PQ: per-class TP, FP, FN counts and IoU sums (see the module docstring).

    Args:
        num_classes: class ids are ``0 .. C-1``.
        thing_classes: the thing class ids (the others are stuff).
        ignore_index: the semantic id of void pixels.
        class_names: optional names carried into the scores.

    Example:
        >>> pq = PanopticQuality(19, thing_classes=range(11, 19))
        >>> pq.update((pred_semantic, pred_instance), (semantic, instance))  # (H, W) each
        >>> pq.compute().pq
    """

    def __init__(
        self,
        num_classes: int,
        thing_classes: Sequence[int],
        ignore_index: int | None = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        things = sorted({int(c) for c in thing_classes})
        if any(not 0 <= c < num_classes for c in things):
            raise ValueError(f"thing classes {things} must lie in 0..{num_classes - 1}")
        if ignore_index is not None and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class id; pick one outside")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names given for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.thing_classes = tuple(things)
        self.ignore_index = ignore_index
        self.class_names = tuple(class_names) if class_names is not None else None
        self._is_thing = np.zeros(self.num_classes, dtype=bool)
        self._is_thing[list(things)] = True
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        self.tp = torch.zeros(c, dtype=torch.int64)
        self.fp = torch.zeros(c, dtype=torch.int64)
        self.fn = torch.zeros(c, dtype=torch.int64)
        self.iou_sum = torch.zeros(c, dtype=torch.float64)

    def _segments(self, semantic: np.ndarray, instance: np.ndarray, what: str) -> np.ndarray:
        """Segment key per pixel: ``class · 2^32 + instance`` (stuff: instance 0); -1 = void."""
        void = (
            semantic == self.ignore_index
            if self.ignore_index is not None
            else np.zeros_like(semantic, bool)
        )
        bad = ~void & ((semantic < 0) | (semantic >= self.num_classes))
        if bad.any():
            shown = np.unique(semantic[bad])[:10].tolist()
            raise InputError(
                f"{what} holds class ids {shown} outside 0..{self.num_classes - 1} that are not "
                f"the ignore index {self.ignore_index}"
            )
        if (instance[~void] < 0).any():
            raise InputError(f"{what} holds negative instance ids")
        cls = np.where(void, 0, semantic)
        inst = np.where(self._is_thing[cls], instance, 0)
        return np.where(void, -1, cls * (1 << 32) + inst)

    def update(self, prediction: Any, target: Any) -> None:
        """Add one image: ``prediction`` and ``target`` are ``(semantic, instance)`` pairs
        of ``(H, W)`` int maps of the same shape."""
        pred_sem, pred_inst = _pair(prediction, "prediction")
        gt_sem, gt_inst = _pair(target, "target")
        if pred_sem.shape != gt_sem.shape:
            raise InputError(
                f"prediction has {pred_sem.size} pixels but target {gt_sem.size}; resize the "
                "prediction to the label's size before scoring"
            )
        pred_keys, pred_idx = np.unique(
            self._segments(pred_sem, pred_inst, "prediction"), return_inverse=True
        )
        gt_keys, gt_idx = np.unique(self._segments(gt_sem, gt_inst, "target"), return_inverse=True)
        n_pred, n_gt = len(pred_keys), len(gt_keys)
        joint = np.bincount(gt_idx * n_pred + pred_idx, minlength=n_gt * n_pred)
        joint = joint.reshape(n_gt, n_pred)  # pixels of gt segment g predicted as p
        pred_area, gt_area = joint.sum(axis=0), joint.sum(axis=1)
        gt_void = gt_keys == -1
        void_of_pred = joint[gt_void].sum(axis=0)  # (n_pred,) pixels on ground-truth void
        pred_cls, gt_cls = pred_keys >> 32, gt_keys >> 32
        gt_crowd = (
            ~gt_void & self._is_thing[np.where(gt_void, 0, gt_cls)] & (gt_keys % (1 << 32) == 0)
        )
        pred_real = pred_keys != -1
        matched_pred = np.zeros(n_pred, dtype=bool)
        matched_gt = np.zeros(n_gt, dtype=bool)
        candidates = np.argwhere(
            (joint > 0)
            & (gt_cls[:, None] == pred_cls[None, :])
            & (~gt_void & ~gt_crowd)[:, None]
            & pred_real[None, :]
        )
        for g, p in candidates:
            union = pred_area[p] + gt_area[g] - joint[g, p] - void_of_pred[p]
            iou = joint[g, p] / union
            if iou > MATCH_IOU:
                matched_gt[g] = matched_pred[p] = True
                self.tp[gt_cls[g]] += 1
                self.iou_sum[gt_cls[g]] += float(iou)
        for g in np.flatnonzero(~matched_gt & ~gt_void & ~gt_crowd):
            self.fn[gt_cls[g]] += 1
        crowd_of_class = {int(gt_cls[g]): g for g in np.flatnonzero(gt_crowd)}
        for p in np.flatnonzero(~matched_pred & pred_real):
            if void_of_pred[p] / pred_area[p] > EXCUSED_FRACTION:
                continue
            crowd = crowd_of_class.get(int(pred_cls[p]))
            if crowd is not None and joint[crowd, p] / pred_area[p] > EXCUSED_FRACTION:
                continue
            self.fp[pred_cls[p]] += 1

    def merge(self, other: PanopticQuality) -> PanopticQuality:
        """Add another metric's sums (another shard or process) into this one."""
        self._check_same(other.state_dict())
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        self.iou_sum += other.iou_sum
        return self

    def state_dict(self) -> dict[str, Any]:
        return {
            "num_classes": self.num_classes,
            "thing_classes": list(self.thing_classes),
            "ignore_index": self.ignore_index,
            "tp": self.tp.clone(),
            "fp": self.fp.clone(),
            "fn": self.fn.clone(),
            "iou_sum": self.iou_sum.clone(),
        }

    def _check_same(self, state: dict[str, Any]) -> None:
        mine = (self.num_classes, list(self.thing_classes), self.ignore_index)
        theirs = (state["num_classes"], list(state["thing_classes"]), state["ignore_index"])
        if mine != theirs:
            raise ValueError(
                f"saved PQ state has (num_classes, thing_classes, ignore_index) = {theirs}; "
                f"this metric has {mine}"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._check_same(state)
        for name, dtype in (("tp", torch.int64), ("fp", torch.int64), ("fn", torch.int64)):
            setattr(self, name, torch.as_tensor(state[name], dtype=dtype).clone())
        self.iou_sum = torch.as_tensor(state["iou_sum"], dtype=torch.float64).clone()

    def compute(self) -> PanopticScores:
        tp, fp, fn = (x.to(torch.float64) for x in (self.tp, self.fp, self.fn))
        counted = (tp + fp + fn) > 0
        denominator = (tp + 0.5 * fp + 0.5 * fn).clamp_min(1e-12)
        nan = torch.full_like(tp, math.nan)
        sq = torch.where(counted, torch.where(tp > 0, self.iou_sum / tp.clamp_min(1), 0.0), nan)
        rq = torch.where(counted, tp / denominator, nan)
        pq = torch.where(counted, self.iou_sum / denominator, nan)
        things = torch.from_numpy(self._is_thing)

        def mean(values: torch.Tensor, keep: torch.Tensor) -> float:
            chosen = values[keep & counted]
            return float(chosen.mean()) if chosen.numel() else math.nan

        every = torch.ones_like(things)
        return PanopticScores(
            *(mean(v, keep) for keep in (every, things, ~things) for v in (pq, sq, rq)),
            per_class_pq=tuple(pq.tolist()),
            per_class_sq=tuple(sq.tolist()),
            per_class_rq=tuple(rq.tolist()),
            tp=tuple(self.tp.tolist()),
            fp=tuple(self.fp.tolist()),
            fn=tuple(self.fn.tolist()),
            thing_classes=self.thing_classes,
            class_names=self.class_names,
        )

    def __repr__(self) -> str:
        return (
            f"PanopticQuality(num_classes={self.num_classes}, things={list(self.thing_classes)}, "
            f"ignore_index={self.ignore_index}, segments={int((self.tp + self.fn).sum())})"
        )
