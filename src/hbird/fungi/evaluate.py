"""The paper's kNN table: embeddings alone, then each gradient added in turn (Table 2).

Each feature set is evaluated on the full training split and on a seeded k-shot subset,
with cosine kNN (majority and softmax-weighted votes; top-1 and mean-per-class accuracy)
and, optionally, retrieval mAP with the test split as queries and the training split
as gallery. With ``pca_dim`` a PCA is fitted on the training features of each setting
(the k-shot subset when evaluating k-shot: it is all the labelled data there is).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from hbird.fungi.extractor import EMBEDDING, combine_parts
from hbird.fungi.knn import knn_evaluate, kshot_indices, retrieval_map
from hbird.fungi.pca import PCA


def cumulative_feature_sets(losses: Sequence[str]) -> list[list[str]]:
    """``["kl", "dino"]`` → ``[["embedding"], ["kl", "embedding"], ["kl", "dino", "embedding"]]``."""
    return [[*losses[:i], EMBEDDING] for i in range(len(losses) + 1)]


def feature_set_label(names: Sequence[str]) -> str:
    grads = [n for n in names if n != EMBEDDING]
    return "embedding" + "".join(f" + {n}" for n in grads)


def knn_table(
    train_parts: dict[str, torch.Tensor],
    train_labels: torch.Tensor,
    test_parts: dict[str, torch.Tensor],
    test_labels: torch.Tensor,
    feature_sets: Sequence[Sequence[str]],
    k: int = 20,
    shots: int | None = 5,
    pca_dim: int | None = None,
    seed: int = 0,
    retrieval: bool = False,
    device: str | torch.device = "cpu",
) -> list[dict[str, Any]]:
    """One row per (feature set, setting): accuracies of both votes, optional mAP.

    Args:
        train_parts, test_parts: ``FungiExtractor.extract_parts`` of each split.
        train_labels, test_labels: ``(N,)`` class ids.
        feature_sets: lists of part names to concatenate (e.g. ``cumulative_feature_sets``).
        k: neighbours. shots: k-shot subset size per class (``None``: full data only).
        pca_dim: PCA dimension per setting (capped by the number of training samples).
        seed: seeds the k-shot subset. retrieval: also compute retrieval mAP.
        device: where the neighbour search runs.
    """
    train_labels = torch.as_tensor(train_labels).long()
    test_labels = torch.as_tensor(test_labels).long()
    settings: list[tuple[str, torch.Tensor]] = [("full", torch.arange(train_labels.numel()))]
    if shots:
        settings.append((f"{shots}-shot", kshot_indices(train_labels, shots, seed)))
    rows = []
    for names in feature_sets:
        train_all = combine_parts(train_parts, names)
        test_all = combine_parts(test_parts, names)
        for setting, chosen in settings:
            train, test = train_all[chosen], test_all
            if pca_dim is not None:
                pca = PCA(min(pca_dim, train.shape[0], train.shape[1])).fit(train)
                train, test = pca.transform(train), pca.transform(test)
            train, test = F.normalize(train, dim=-1), F.normalize(test, dim=-1)
            labels = train_labels[chosen]
            row: dict[str, Any] = {
                "features": feature_set_label(names),
                "parts": list(names),
                "setting": setting,
                "train_size": int(chosen.numel()),
                "dim": int(train.shape[1]),
                **knn_evaluate(train, labels, test, test_labels, k=k, device=device),
            }
            if retrieval:
                row["retrieval_map"] = retrieval_map(test, test_labels, train, labels)
            rows.append(row)
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Rows of :func:`knn_table` as a fixed-width text table (accuracies in %)."""
    has_map = any("retrieval_map" in r for r in rows)
    header = f"{'features':<34} {'setting':<8} {'dim':>5}  {'top1':>6} {'mpc':>6}  {'top1-sm':>7} {'mpc-sm':>6}"
    header += f"  {'mAP':>6}" if has_map else ""
    lines = [header, "-" * len(header)]
    for r in rows:
        line = (
            f"{r['features']:<34} {r['setting']:<8} {r['dim']:>5}  "
            f"{100 * r['majority']['top1']:6.2f} {100 * r['majority']['mean_per_class']:6.2f}  "
            f"{100 * r['softmax']['top1']:7.2f} {100 * r['softmax']['mean_per_class']:6.2f}"
        )
        if has_map:
            line += f"  {100 * r.get('retrieval_map', float('nan')):6.2f}"
        lines.append(line)
    return "\n".join(lines)
