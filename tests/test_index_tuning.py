"""IVF-PQ tuned for a target recall after the build (issue 15, target 2), against brute force."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("faiss")

from hbird.errors import InputError  # noqa: E402
from hbird.index import (  # noqa: E402
    AUTO_RECALL,
    ExactIndex,
    FaissIVFPQIndex,
    create_index,
    load_index,
)
from hbird.index.cache import load_or_build  # noqa: E402
from hbird.index.synthetic import clustered_unit_vectors  # noqa: E402
from hbird.index.tuning import (  # noqa: E402
    K_FACTORS,
    RECALL_K,
    drop_own,
    exact_ids,
    sample_rows,
)
from test_index_faiss import one_faiss_thread  # noqa: E402, F401 (autouse: one faiss thread)

DIM, N, QUERIES = 32, 12_000, 300


@pytest.fixture(scope="module")
def keys() -> torch.Tensor:
    return clustered_unit_vectors(N, DIM, n_clusters=40, spread=0.9, seed=0)


@pytest.fixture(scope="module")
def tuned(keys) -> FaissIVFPQIndex:
    index = FaissIVFPQIndex(DIM, nlist=64, m=8, recall=0.95, recall_queries=QUERIES, seed=3)
    return index.fill(keys)


def _brute_force_recall(index, keys: torch.Tensor, count: int, seed: int, **settings: int) -> float:
    """Held-out recall@30 on the tuner's sample rows, by a plain loop over queries: the
    share of each sampled key's 30 most similar *other* keys (full matmul, its own row
    excluded) among the index's first 30 answers that are not the key itself (it is
    asked for 31), at ``settings`` if given."""
    rows = sample_rows(keys.shape[0], count, seed).tolist()
    queries = keys[rows].float()
    before = index.nprobe, index.k_factor
    for name, value in settings.items():
        setattr(index, name, value)
    try:
        found = index.search(queries, RECALL_K + 1)[1]
    finally:
        index.nprobe, index.k_factor = before
    shares = []
    for row, query, answer in zip(rows, queries, found.tolist()):
        sims = keys.float() @ query
        sims[row] = float("-inf")
        truth = set(sims.topk(RECALL_K).indices.tolist())
        others = [i for i in answer if i != row][:RECALL_K]
        shares.append(len(truth & set(others)) / RECALL_K)
    return sum(shares) / len(shares)


def test_drop_own_removes_the_query_key_or_the_last() -> None:
    ids = torch.tensor([[5, 2, 9, 1], [3, 4, 6, 8], [7, 0, 1, 2]])
    own = torch.tensor([9, 1, 7])  # in row 0 at column 2, absent from row 1, first in row 2
    want = torch.tensor([[5, 2, 1], [3, 4, 6], [0, 1, 2]])
    assert torch.equal(drop_own(ids, own), want)


def test_tuner_reaches_the_target_with_the_smallest_k_factor(tuned, keys) -> None:
    assert tuned.measured_recall is not None and tuned.measured_recall >= 0.95
    got = _brute_force_recall(tuned, keys, QUERIES, 3)
    assert got == pytest.approx(tuned.measured_recall, abs=1e-4)  # what it says it measured
    assert got >= 0.95
    smaller = K_FACTORS.index(tuned.k_factor) - 1
    if smaller >= 0:  # one step fewer candidates at the same nprobe misses the target
        assert _brute_force_recall(tuned, keys, QUERIES, 3, k_factor=K_FACTORS[smaller]) < 0.95
    assert (tuned.nprobe, tuned.k_factor) != (32, 32)  # not simply the untuned defaults


def test_exact_ids_over_pieces_equal_one_search(keys) -> None:
    queries = keys[:50] + 0.01
    pieces = [keys[:1000], keys[1000:1000], keys[1000:7001], keys[7001:]]
    want = (queries @ keys.T).topk(RECALL_K, dim=1).indices
    assert torch.equal(exact_ids(queries, pieces, RECALL_K), want)
    assert torch.equal(ExactIndex(DIM).fill(keys).search(queries, RECALL_K)[1], want)


def test_fill_from_tunes_like_fill(tuned, keys) -> None:
    streamed = FaissIVFPQIndex(DIM, nlist=64, m=8, recall=0.95, recall_queries=QUERIES, seed=3)
    streamed.fill_from(lambda: keys.split(5000), N)
    assert (streamed.nprobe, streamed.k_factor, streamed.measured_recall) == (
        tuned.nprobe,
        tuned.k_factor,
        tuned.measured_recall,
    )


def test_tuned_settings_and_measured_recall_round_trip(tuned, keys, tmp_path) -> None:
    info = tuned.describe()
    assert info["recall"] == 0.95 and info["measured_recall"] == tuned.measured_recall
    loaded = load_index(tuned.save(tmp_path / "idx"))
    assert isinstance(loaded, FaissIVFPQIndex)
    for name in ("nprobe", "k_factor", "recall", "measured_recall"):
        assert getattr(loaded, name) == getattr(tuned, name), name
    # a cache lookup keeps the tuned values (an empty index has the untuned defaults)
    empty = FaissIVFPQIndex(DIM, nlist=64, m=8, recall=0.95, recall_queries=QUERIES, seed=3)
    first = load_or_build(empty, lambda ix: ix.fill(keys), N, tmp_path / "cache", "keys-v1")
    again_empty = FaissIVFPQIndex(DIM, nlist=64, m=8, recall=0.95, recall_queries=QUERIES, seed=3)
    again = load_or_build(again_empty, pytest.fail, N, tmp_path / "cache", "keys-v1")
    assert (again.nprobe, again.k_factor, again.measured_recall) == (
        first.nprobe,
        first.k_factor,
        first.measured_recall,
    )
    assert again is not again_empty  # read from the cache, not rebuilt
    # given settings replace tuned ones on the same cached index (no rebuild) ...
    manual = FaissIVFPQIndex(
        DIM, nlist=64, m=8, k_factor=4, nprobe=2, recall_queries=QUERIES, seed=3
    )
    reused = load_or_build(manual, pytest.fail, N, tmp_path / "cache", "keys-v1")
    assert (reused.nprobe, reused.k_factor, reused.recall, reused.measured_recall) == (
        2,
        4,
        None,
        None,
    )
    # ... while another target recall needs tuning, so a build
    stricter = FaissIVFPQIndex(DIM, nlist=64, m=8, recall=0.99, recall_queries=QUERIES, seed=3)
    built = []
    load_or_build(
        stricter, lambda ix: built.append(ix) or ix.fill(keys), N, tmp_path / "cache", "keys-v1"
    )
    assert built == [stricter] and stricter.measured_recall >= 0.99


def test_unreachable_target_warns_and_keeps_the_best(keys) -> None:
    index = FaissIVFPQIndex(DIM, nlist=16, m=2, recall=1.0, recall_queries=100)
    with pytest.warns(UserWarning, match="below the target 1.0"):
        index.fill(keys)
    assert index.measured_recall < 1.0
    assert index.measured_recall == pytest.approx(
        _brute_force_recall(index, keys, 100, 0), abs=1e-4
    )


def test_auto_targets_the_default_recall_and_rejects_conflicts() -> None:
    auto = create_index("auto", DIM, expected_size=50_000)
    assert isinstance(auto, FaissIVFPQIndex) and auto.recall == AUTO_RECALL == 0.9
    assert create_index("auto", DIM, expected_size=50_000, recall=0.95).recall == 0.95
    assert create_index("auto", DIM, expected_size=50_000, k_factor=8).recall is None
    assert isinstance(create_index("auto", DIM, expected_size=100, recall=0.95), ExactIndex)
    assert create_index("ivfpq", DIM).recall is None  # an explicit ivfpq is not tuned
    with pytest.raises(InputError, match="give either recall or nprobe"):
        create_index("auto", DIM, expected_size=50_000, recall=0.95, nprobe=4)
    with pytest.raises(InputError, match=r"recall must be a number in \(0, 1\]"):
        FaissIVFPQIndex(DIM, recall=1.5)
