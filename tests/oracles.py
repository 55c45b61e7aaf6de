"""Checks written independently of hbird's code, for tests to compare against.

- :func:`assert_same_neighbours`: search results against an oracle's, up to ties, in
  the way of faiss's ``contrib.evaluation.check_ref_knn_with_draws``.
- :func:`eq1_weights`: eq. 1 of Balazevic et al. (2023), §3.1, in float64.
- :func:`miou`: mean IoU from pixel counts in numpy (not hbird's ConfusionMatrix).
- :func:`retrieval_miou`: the retrieval protocol by hand: the predictor fitted on a
  prompt, its predictions scored by :func:`miou` (no evaluation harness involved).
"""

from __future__ import annotations

import numpy as np
import torch


def assert_same_neighbours(
    sims: torch.Tensor,
    ids: torch.Tensor,
    want_sims: torch.Tensor,
    want_ids: torch.Tensor,
    atol: float = 1e-5,
    rtol: float = 1.3e-6,
) -> None:
    """``(Q, k)`` similarities and ids equal to an oracle's wherever ties allow.

    Similarities must match (padding ``-inf`` included; the tolerances default to
    ``torch.testing.assert_close``'s for float32). Ids may differ only by their
    order inside a run of equal oracle similarity (equal within ``atol + rtol·|s|``);
    the run that reaches the k-th column is skipped, as faiss does, because a tie
    at the cut may keep any of the tied keys.
    """
    assert sims.shape == ids.shape == want_sims.shape == want_ids.shape
    torch.testing.assert_close(sims, want_sims, atol=atol, rtol=rtol)
    for row, (got, want, ref) in enumerate(
        zip(ids.tolist(), want_ids.tolist(), want_sims.tolist())
    ):
        if got == want:
            continue
        start = 0
        while start < len(ref):
            stop = start + 1
            while stop < len(ref) and abs(ref[stop] - ref[start]) <= atol + rtol * abs(ref[start]):
                stop += 1
            if stop < len(ref):  # not the last run
                assert sorted(got[start:stop]) == sorted(want[start:stop]), (
                    f"query {row}: ids {got[start:stop]} where the oracle has {want[start:stop]} "
                    f"at similarity {ref[start]:.6g}"
                )
            start = stop


def eq1_weights(queries: torch.Tensor, keys: torch.Tensor, beta: float) -> torch.Tensor:
    """``(Q, D)`` queries and their neighbours' ``(Q, k, D)`` keys → ``(Q, k)`` float64 weights.

    Eq. 1 (§3.1): ``s_ij = <q_i, k_j> / (|q_i| |k_j|) / β``, ``a_i = softmax_j(s_i)``.
    """
    q, k = queries.double(), keys.double()
    s = (k @ q[:, :, None])[..., 0] / (k.norm(dim=-1) * q.norm(dim=-1, keepdim=True) * beta)
    a = (s - s.max(dim=1, keepdim=True).values).exp()
    return a / a.sum(dim=1, keepdim=True)


def miou(
    preds: list[torch.Tensor],
    targets: list[torch.Tensor],
    num_classes: int,
    ignore_index: int = 255,
) -> float:
    """Mean over classes present in the predictions or targets of ``|P ∩ T| / |P ∪ T|``.

    Pixels whose target is ``ignore_index`` are left out; classes absent from both the
    predictions and the targets are left out of the mean.
    """
    inter = np.zeros(num_classes)
    union = np.zeros(num_classes)
    for pred, target in zip(preds, targets):
        p, t = np.asarray(pred).ravel(), np.asarray(target).ravel()
        keep = t != ignore_index
        p, t = p[keep], t[keep]
        for c in range(num_classes):
            inter[c] += np.sum((p == c) & (t == c))
            union[c] += np.sum((p == c) | (t == c))
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def retrieval_miou(prompt, queries, num_classes: int, **settings) -> float:
    """mIoU of ``InContextPredictor(**settings)`` fitted on dataset ``prompt``, over ``queries``.

    ``settings`` are predictor arguments (encoder, layers, image_size, k, ...).
    """
    from hbird.predictor import InContextPredictor

    predictor = InContextPredictor(**settings, progress=False).fit_dataset(prompt)
    preds = predictor.predict([s.image for s in queries])
    return miou(preds, [s.label for s in queries], num_classes)
