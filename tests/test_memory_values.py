"""Sparse bank values (memory/values.py): lossless against dense rows, eq. 1 unchanged.

Oracles: the dense ``(N, C)`` rows themselves (every gathered row, save/load, slices,
removal and a whole predictor's output are compared bit for bit), and a hand-computed
case of eq. 1 (Balazevic et al. 2023, §3.1).
"""

import math

import pytest
import torch

from hbird import InContextPredictor
from hbird.decode import aggregate, softmax_over_neighbours
from hbird.errors import BankError
from hbird.labelspec import LabelSpec
from hbird.memory.bank import MemoryBank
from hbird.memory.values import SLOTS, SparseValues

ENC = {"name": "test_vit", "config_hash": "abc", "weights_hash": "123"}


def class_fractions(n, classes, seed=0, max_classes=5):
    """``(n, C)`` patch histograms: 1 to ``max_classes`` classes per row, mostly one."""
    gen = torch.Generator().manual_seed(seed)
    counts = torch.multinomial(torch.tensor([0.6, 0.25, 0.1, 0.03, 0.02][:max_classes]), n,
                               replacement=True, generator=gen) + 1  # fmt: skip
    rows = torch.zeros(n, classes)
    for i, c in enumerate(counts.tolist()):
        picked = torch.randperm(classes, generator=gen)[:c]
        pixels = torch.randint(1, 64, (c,), generator=gen).float()
        rows[i, picked] = pixels / pixels.sum()
    return rows


def test_gathered_rows_equal_the_dense_rows_bit_for_bit():
    dense = class_fractions(500, 150)
    assert ((dense != 0).sum(1) > SLOTS).any()  # some rows need the overflow
    store = SparseValues(150)
    for piece in dense.split(77):
        store.append(piece)
    ids = torch.randint(0, 500, (40, 30), generator=torch.Generator().manual_seed(1))
    assert torch.equal(store.gather(ids), dense[ids])
    assert torch.equal(store.dense(), dense)
    few = SparseValues(1)  # fewer classes than slots
    few.append(torch.tensor([[1.0], [0.0]]))
    assert torch.equal(few.dense(), torch.tensor([[1.0], [0.0]]))


def test_bytes_per_entry():
    """2 int16 classes + 2 float32 weights = 12 bytes; rows with more than 2 classes add
    their dense row (600 bytes at 150 classes) and an int64 id."""
    dense = class_fractions(2000, 150, seed=2)
    store = SparseValues(150)
    store.append(dense)
    overflow = int(((dense != 0).sum(1) > 2).sum())
    assert store.entry_bytes() == pytest.approx(12 + overflow * (600 + 8) / 2000)
    pure = SparseValues(150)
    pure.append(torch.eye(150))
    assert pure.entry_bytes() == 12.0


def test_eq1_on_a_hand_case():
    """Two neighbours with cosines 0.9 and 0.8, β = 0.1: weights e/(e+1) and 1/(e+1).
    Neighbour 0 is pure class 2; neighbour 1 is 1/4 class 0 and 3/4 class 2. Eq. 1 gives
    class 0: 1/(4(e+1)), class 2: e/(e+1) + 3/(4(e+1)), other classes 0."""
    bank = MemoryBank(2, LabelSpec(task="segmentation", num_classes=4), ENC,
                      value_storage="sparse")  # fmt: skip
    bank.append(torch.randn(2, 2), torch.tensor([[0, 0, 1.0, 0], [0.25, 0, 0.75, 0]]))
    weights = softmax_over_neighbours(torch.tensor([[0.9, 0.8]]), 0.1)
    out = aggregate(weights, bank.gather_values(torch.tensor([[0, 1]])))[0]
    e = math.e
    expected = torch.tensor([1 / (4 * (e + 1)), 0, e / (e + 1) + 3 / (4 * (e + 1)), 0])
    assert torch.allclose(out, expected, atol=1e-6)


def sparse_and_dense_banks(n=300, classes=150):
    spec = LabelSpec(task="segmentation", num_classes=classes)
    keys, values = torch.randn(n, 8), class_fractions(n, classes, seed=3)
    banks = []
    for storage in ("dense", "sparse"):
        bank = MemoryBank(8, spec, ENC, value_storage=storage)
        for i, (k, v) in enumerate(zip(keys.split(30), values.split(30))):
            bank.append(k, v, num_images=1, image_ids=i)
        banks.append(bank)
    return banks


def test_sparse_banks_save_load_slice_and_remove_like_dense_ones(tmp_path):
    dense, sparse = sparse_and_dense_banks()
    path = sparse.save(tmp_path / "sparse", shard_size=70)
    manifest = MemoryBank.read_manifest(path)
    assert manifest["format_version"] == 2 and manifest["value_storage"] == "sparse"
    dense_path = dense.save(tmp_path / "dense")
    assert MemoryBank.read_manifest(dense_path)["format_version"] == 1
    dense = MemoryBank.load(dense_path)  # saving renormalises the keys, in both banks
    loaded = MemoryBank.load(path)
    assert loaded.value_storage == "sparse"
    assert torch.equal(loaded.values, dense.values) and torch.equal(loaded.keys, dense.keys)
    for rows in ((0, 300), (65, 212), (140, 141)):  # across shard boundaries
        part = MemoryBank.load(path, rows=rows)
        assert torch.equal(part.values, dense.values[rows[0] : rows[1]])
    on_disk = MemoryBank.load(path, keys=False)
    assert torch.equal(on_disk.values, dense.values)
    for bank in (dense, loaded):
        assert bank.remove([2, 5]) == 60
    assert torch.equal(loaded.values, dense.values) and torch.equal(loaded.keys, dense.keys)
    assert torch.equal(loaded.image_ids, dense.image_ids)
    resaved = MemoryBank.load(loaded.save(tmp_path / "again", shard_size=100))
    assert torch.equal(resaved.values, dense.values)


def test_sparse_storage_is_for_class_banks():
    with pytest.raises(BankError, match="value_storage=dense"):
        MemoryBank(4, LabelSpec(task="depth"), ENC, value_storage="sparse")


def test_a_predictor_with_sparse_values_predicts_exactly_as_with_dense(scenes, tmp_path):
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:8]], [s.mask for s in prompt[:8]]
    q = [s.image for s in queries[:3]]
    kw = dict(encoder="test_vit", layers=0, image_size=64, k=10, index="exact", progress=False)
    dense = InContextPredictor(**kw).fit(images, masks, num_classes=4)
    sparse = InContextPredictor(**kw, value_storage="sparse").fit(images, masks, num_classes=4)
    assert sparse.bank_.value_storage == "sparse"
    assert ((dense.bank_.values != 0).sum(1) == 2).any()  # mixed patches are in the test
    for a, b in zip(dense.predict_dense(q), sparse.predict_dense(q)):
        assert torch.equal(a.patch_labels, b.patch_labels) and torch.equal(a.labels, b.labels)
    reloaded = InContextPredictor.load(sparse.save(tmp_path / "bank"), progress=False)
    assert reloaded.bank_.value_storage == "sparse"
    assert all(torch.equal(a, b) for a, b in zip(dense.predict(q), reloaded.predict(q)))


def test_bank_build_with_sparse_values_from_the_cli(scenes, tmp_path, capsys):
    from hbird.cli import main
    from hbird.data.synthetic import write_scene_folder

    write_scene_folder(tmp_path / "prompt", scenes[0][:4])
    fast = "--task segmentation --encoder test_vit --layers 0 --image-size 64 --quiet".split()
    built = {}
    for storage in ("dense", "sparse"):
        out = tmp_path / storage
        argv = ["bank", "build", "--prompt", str(tmp_path / "prompt"), "--out", str(out)]
        assert main([*argv, *fast, "--value-storage", storage]) == 0
        built[storage] = MemoryBank.load(out)
    assert built["sparse"].value_storage == "sparse"
    assert torch.equal(built["sparse"].values, built["dense"].values)
    capsys.readouterr()
    assert main(["bank", "info", str(tmp_path / "sparse")]) == 0
    assert "values      sparse" in capsys.readouterr().out
