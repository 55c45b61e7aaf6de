"""Registry, create_index/auto choice, load_index dispatch, recall_at_k, optional deps."""

from __future__ import annotations

import json

import pytest
import torch

from hbird import _optional
from hbird.errors import InputError
from hbird.index import (
    AUTO_EXACT_MAX,
    AUTO_EXACT_MAX_GPU,
    EXACT_WARN_ABOVE,
    INDEXES,
    ExactIndex,
    FaissFlatIndex,
    FaissIVFPQIndex,
    choose_kind,
    create_index,
    load_index,
    recall_at_k,
)


def test_registry_names() -> None:
    assert INDEXES.names() == ["exact", "flat", "hnsw", "ivfmm", "ivfpq", "scann"]
    for name in INDEXES:
        assert INDEXES.get(name).kind == name


@pytest.mark.parametrize(
    ("size", "kind"),
    [
        (None, "exact"),
        (0, "exact"),
        (AUTO_EXACT_MAX, "exact"),
        (AUTO_EXACT_MAX + 1, "ivfpq"),
        (EXACT_WARN_ABOVE + 1, "ivfpq"),
    ],
)
def test_choose_kind_with_faiss(size: int | None, kind: str) -> None:
    assert choose_kind(size, faiss_available=True) == kind


def test_choose_kind_without_faiss() -> None:
    assert choose_kind(EXACT_WARN_ABOVE, faiss_available=False) == "exact"
    with pytest.warns(UserWarning, match="install faiss"):
        assert choose_kind(EXACT_WARN_ABOVE + 1, faiss_available=False) == "exact"


def test_create_index_auto_and_params() -> None:
    assert isinstance(create_index("auto", 8), ExactIndex)
    assert isinstance(create_index("auto", 8, expected_size=1000, chunk_size=7), ExactIndex)
    assert create_index("exact", 8, chunk_size=7).chunk_size == 7
    pytest.importorskip("faiss")
    assert isinstance(create_index("auto", 8, expected_size=AUTO_EXACT_MAX + 1), FaissIVFPQIndex)
    big = create_index("auto", 8, expected_size=4_000_000)
    assert isinstance(big, FaissIVFPQIndex) and big.expected_size == 4_000_000
    assert create_index("ivfpq", 8, expected_size=10_000, nprobe=4).nprobe == 4


def test_create_index_errors() -> None:
    with pytest.raises(InputError, match="unknown index kind 'annoy'.*auto.*exact, flat"):
        create_index("annoy", 8)
    with pytest.raises(InputError, match="expected_size"):
        create_index("auto", 8, expected_size=-1)


def test_missing_faiss_error_names_the_extra(monkeypatch) -> None:
    monkeypatch.setattr(_optional, "is_available", lambda module: False)
    with pytest.raises(ImportError, match=r"hbird\[faiss\]"):
        create_index("flat", 8)
    with pytest.raises(ImportError, match=r"hbird\[scann\]"):
        create_index("scann", 8)


def test_load_index_dispatch_and_errors(tmp_path) -> None:
    keys = torch.nn.functional.normalize(torch.randn(20, 4), dim=1)
    exact = ExactIndex(4)
    exact.add(keys)
    path = exact.save(tmp_path / "exact")
    assert json.loads((path / "index.json").read_text())["kind"] == "exact"
    assert isinstance(load_index(path), ExactIndex)

    with pytest.raises(InputError, match="not a saved index"):
        load_index(tmp_path / "nowhere")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="refusing to overwrite"):
        exact.save(tmp_path / "junk")
    assert (tmp_path / "junk" / "notes.txt").read_text() == "mine"

    meta = json.loads((path / "index.json").read_text())
    (path / "index.json").write_text(json.dumps({**meta, "kind": "annoy"}))
    with pytest.raises(InputError, match="unknown kind 'annoy'"):
        load_index(path)
    (path / "index.json").write_text(json.dumps({**meta, "ntotal": 21}))
    with pytest.raises(InputError, match="corrupt"):
        load_index(path)
    pytest.importorskip("faiss")
    (path / "index.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match="holds a 'exact' index, not 'flat'"):
        FaissFlatIndex.load(path)


def test_failed_save_leaves_nothing_behind(tmp_path, monkeypatch) -> None:
    index = ExactIndex(4)
    index.add(torch.nn.functional.normalize(torch.randn(5, 4), dim=1))

    def broken(folder):
        (folder / "partial").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(index, "_save_payload", broken)
    with pytest.raises(OSError, match="disk full"):
        index.save(tmp_path / "idx")
    assert list(tmp_path.iterdir()) == []


def test_recall_at_k() -> None:
    exact = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]])
    assert recall_at_k(exact, exact) == 1.0
    approx = torch.tensor([[3, 2, 10, 11], [7, 6, 5, 4], [9, -1, -1, -1]])
    assert recall_at_k(approx, exact) == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    # padding in both never counts as a match; wider approx lists give recall k@k_a
    assert recall_at_k(torch.full((3, 2), -1), exact) == 0.0
    wide = torch.cat([approx, torch.tensor([[0, 1], [0, 0], [8, 0]])], dim=1)
    assert recall_at_k(wide, exact) == pytest.approx((1.0 + 1.0 + 1.0) / 3)
    assert recall_at_k(approx.numpy(), exact.numpy(), query_chunk_size=1) == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="same M"):
        recall_at_k(approx[:2], exact)
    with pytest.raises(InputError, match="no neighbours"):
        recall_at_k(approx, torch.full((3, 4), -1))


def test_choose_kind_on_gpu_stays_exact_longer() -> None:
    assert choose_kind(EXACT_WARN_ABOVE + 1, faiss_available=True, device="cuda") == "exact"
    assert choose_kind(AUTO_EXACT_MAX_GPU + 1, faiss_available=True, device="cuda") == "ivfpq"
    assert choose_kind(AUTO_EXACT_MAX + 1, faiss_available=True, device="cpu") == "ivfpq"
