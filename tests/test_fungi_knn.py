"""kNN votes, k-shot subsets, retrieval mAP and the kNN table against brute-force oracles."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.errors import InputError
from hbird.fungi.data import load_classification, synthetic_classification
from hbird.fungi.evaluate import cumulative_feature_sets, format_table, knn_table
from hbird.fungi.knn import (
    knn_evaluate,
    knn_predict,
    kshot_indices,
    retrieval_map,
    vote,
)


def majority_oracle(sims, labels):
    counts = Counter(labels)
    best = max(counts.values())
    tied = [c for c, n in counts.items() if n == best]
    summed = {c: sum(s for s, lab in zip(sims, labels) if lab == c) for c in tied}
    top = max(summed.values())
    return min(c for c in tied if summed[c] == top)


def test_majority_vote_matches_the_oracle_including_ties():
    gen = torch.Generator().manual_seed(0)
    sims = torch.rand(200, 6, generator=gen)
    labels = torch.randint(0, 3, (200, 6), generator=gen)
    pred = vote(sims, labels, 3, "majority").argmax(1)
    expected = [majority_oracle(s.tolist(), lab.tolist()) for s, lab in zip(sims, labels)]
    assert pred.tolist() == expected
    # an explicit tie: two votes each, class 2's neighbours are closer
    tie = vote(torch.tensor([[0.9, 0.1, 0.8, 0.7]]), torch.tensor([[1, 1, 2, 2]]), 3, "majority")
    assert int(tie.argmax()) == 2


def test_softmax_vote_matches_its_definition():
    sims = torch.tensor([[0.9, 0.5, 0.45, 0.4]])
    labels = torch.tensor([[0, 1, 1, 1]])
    scores = vote(sims, labels, 2, "softmax", temperature=0.07)
    w = [math.exp(s / 0.07) for s in sims[0].tolist()]
    assert int(scores.argmax()) == (0 if w[0] > sum(w[1:]) else 1) == 0
    assert int(vote(sims, labels, 2, "majority").argmax()) == 1
    with pytest.raises(ValueError, match="vote"):
        vote(sims, labels, 2, "mean")


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_knn_predict_matches_brute_force_cosine(device):
    gen = np.random.default_rng(1)
    train = gen.normal(size=(60, 8)).astype(np.float32)
    labels = gen.integers(0, 4, 60)
    query = gen.normal(size=(15, 8)).astype(np.float32)
    pred = knn_predict(
        torch.from_numpy(train * 3.0),
        torch.from_numpy(labels),
        torch.from_numpy(query),
        k=7,
        device=device,
    )
    assert pred.device.type == "cpu"
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    for i, q in enumerate(qn):
        sims = tn @ q
        top = np.argsort(-sims)[:7]
        assert int(pred[i]) == majority_oracle(sims[top].tolist(), labels[top].tolist())


def test_kshot_subsets_are_balanced_and_seeded():
    labels = torch.tensor([0] * 10 + [1] * 3 + [2] * 8)
    chosen = kshot_indices(labels, 5, seed=0)
    assert Counter(labels[chosen].tolist()) == {0: 5, 1: 3, 2: 5}
    assert torch.equal(chosen, kshot_indices(labels, 5, seed=0))
    assert not torch.equal(chosen, kshot_indices(labels, 5, seed=1))


def test_retrieval_map_matches_a_hand_computed_case():
    gallery = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-1.0, 0.0]])
    gallery_labels = torch.tensor([0, 1, 0, 0])
    query = torch.tensor([[1.0, 0.1]])
    # ranking: g0 (rel), g1 (not), g2 (rel), g3 (rel): AP = (1/1 + 2/3 + 3/4) / 3
    ap = retrieval_map(query, torch.tensor([0]), gallery, gallery_labels)
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    with pytest.raises(InputError, match="no query"):
        retrieval_map(query, torch.tensor([5]), gallery, gallery_labels)


def test_retrieval_map_matches_brute_force():
    gen = np.random.default_rng(2)
    q, g = gen.normal(size=(9, 5)), gen.normal(size=(30, 5))
    ql, gl = gen.integers(0, 3, 9), gen.integers(0, 3, 30)
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    aps = []
    for i in range(9):
        order = np.argsort(-(gn @ qn[i]), kind="stable")
        hits, precisions = 0, []
        for rank, j in enumerate(order, start=1):
            if gl[j] == ql[i]:
                hits += 1
                precisions.append(hits / rank)
        if precisions:
            aps.append(np.mean(precisions))
    got = retrieval_map(
        torch.from_numpy(q), torch.from_numpy(ql), torch.from_numpy(g), torch.from_numpy(gl)
    )
    assert got == pytest.approx(float(np.mean(aps)), rel=1e-6)


def test_knn_evaluate_and_table_on_separable_parts():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 5
    labels = torch.arange(40) % 4
    noise = torch.randn(40, 4, generator=gen)
    parts = {"embedding": torch.nn.functional.normalize(centres[labels] + noise, dim=1)}
    parts["kl"] = torch.nn.functional.normalize(torch.randn(40, 4, generator=gen), dim=1)
    result = knn_evaluate(parts["embedding"], labels, parts["embedding"], labels, k=5)
    assert result["majority"]["top1"] == 1.0 and result["softmax"]["mean_per_class"] == 1.0
    rows = knn_table(
        parts,
        labels,
        parts,
        labels,
        cumulative_feature_sets(["kl"]),
        k=5,
        shots=2,
        pca_dim=3,
        retrieval=True,
    )
    assert [(r["features"], r["setting"]) for r in rows] == [
        ("embedding", "full"),
        ("embedding", "2-shot"),
        ("embedding + kl", "full"),
        ("embedding + kl", "2-shot"),
    ]
    assert rows[0]["majority"]["top1"] == 1.0 and rows[0]["dim"] == 3 and rows[1]["train_size"] == 8
    assert "retrieval_map" in rows[0] and "embedding + kl" in format_table(rows)


def test_synthetic_classification_is_seeded_and_balanced():
    a = synthetic_classification(8, seed=0, num_classes=4, size=32)
    b = synthetic_classification(8, seed=0, num_classes=4, size=32)
    assert a.labels.tolist() == [0, 1, 2, 3] * 2
    assert all(torch.equal(x, y) for x, y in zip(a.images, b.images))
    assert a.class_names == ("disc", "box", "triangle", "ellipse")
    train = load_classification("synthetic:train=6:val=4:classes=3:size=32", "train")
    val = load_classification("synthetic:train=6:val=4:classes=3:size=32", "val")
    assert len(train) == 6 and len(val) == 4
    assert not torch.equal(train.images[0], val.images[0])
    with pytest.raises(InputError, match=r"give each split a size >= 1"):
        load_classification("synthetic:train=0:val=4", "train")


def test_folder_layouts(tmp_path):
    for split, names in (("train", ["cat", "dog"]), ("val", ["dog"])):
        for name in names:
            (tmp_path / "cls" / split / name).mkdir(parents=True)
            Image.new("RGB", (10, 12), (200, 10, 10)).save(
                tmp_path / "cls" / split / name / "a.png"
            )
    val = load_classification(f"folder:root={tmp_path / 'cls'}", "val")
    assert val.labels.tolist() == [1] and val.class_names == ("cat", "dog")
    assert val.images[0].shape == (3, 12, 10) and len(val.images[0:1]) == 1
    scenes = make_scenes(3, seed=0, num_classes=4, size=(24, 24), num_objects=(1, 1))
    write_scene_folder(tmp_path / "dense" / "train", scenes)
    dense = load_classification(f"folder:root={tmp_path / 'dense'}", "train")
    assert dense.labels.tolist() == [1, 2, 3]
    with pytest.raises(InputError, match="does not exist"):
        load_classification(f"folder:root={tmp_path / 'cls'}", "test")
    with pytest.raises(InputError, match="unknown classification dataset"):
        load_classification("voc:root=/x", "train")
