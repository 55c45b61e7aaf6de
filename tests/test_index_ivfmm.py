"""``MatmulIVFIndex`` (IVF scored by one bf16 matmul per probed list) against exact oracles."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("faiss")

from hbird.errors import InputError  # noqa: E402
from hbird.index import ExactIndex, MatmulIVFIndex, create_index, load_index  # noqa: E402
from hbird.index.base import META_FILE  # noqa: E402
from hbird.index.cache import cache_path, load_or_build  # noqa: E402
from hbird.index.ivf_matmul import padded_size  # noqa: E402
from hbird.index.recall import recall_at_k  # noqa: E402
from hbird.index.synthetic import clustered_unit_vectors  # noqa: E402
from hbird.index.tuning import TUNER_VERSION  # noqa: E402
from test_index_faiss import one_faiss_thread  # noqa: E402, F401 (autouse: one faiss thread)
from test_index_tuning import _brute_force_recall  # noqa: E402

DIM, N, NLIST = 32, 3000, 24


@pytest.fixture(scope="module")
def keys() -> torch.Tensor:
    return clustered_unit_vectors(N, DIM, n_clusters=12, spread=0.8, seed=0).half()


@pytest.fixture(scope="module")
def queries() -> torch.Tensor:
    """Like one image's patches: many queries from few blobs, plus unrelated ones."""
    image = clustered_unit_vectors(150, DIM, n_clusters=12, spread=0.8, seed=1)[:120]
    other = torch.randn(30, DIM, generator=torch.Generator().manual_seed(5))
    other = torch.nn.functional.normalize(other, dim=1)
    return torch.cat([image, other])


@pytest.fixture(scope="module")
def built(keys) -> MatmulIVFIndex:
    return MatmulIVFIndex(DIM, nlist=NLIST, nprobe=3).fill(keys)


def _probed_oracle(index, keys, queries, nprobe, k):
    """IVF by plain loops: each key's list is its most similar centroid, each query scans
    its ``nprobe`` most similar centroids' lists, ranked by exact float32 inner product."""
    centroids = index._centroids
    key_list = [int(torch.argmax(centroids @ key.float())) for key in keys]
    out = []
    for query in queries:
        probed = set((centroids @ query).topk(nprobe).indices.tolist())
        candidates = torch.tensor([i for i, lst in enumerate(key_list) if lst in probed])
        sims = keys[candidates].float() @ query
        top = sims.topk(min(k, len(candidates)))
        out.append((top.values, candidates[top.indices]))
    return out


@pytest.mark.parametrize("nprobe", [1, 3, 7])
def test_scans_exactly_the_probed_lists(built, keys, queries, nprobe) -> None:
    """With every candidate of the probed lists kept (k_factor large), the answer is the
    exact top-k of those lists: the grouping by list, the padded matmul shapes, the
    heaps and the re-scoring lose nothing and add nothing."""
    k = 10
    built.nprobe, built.k_factor = nprobe, N // k
    sims, ids = built.search(queries, k)
    for row, (want_sims, want_ids) in enumerate(_probed_oracle(built, keys, queries, nprobe, k)):
        found = ids[row][ids[row] >= 0]  # a list shorter than k leaves -1 slots
        assert len(found) == len(want_ids) and set(found.tolist()) == set(want_ids.tolist())
        assert torch.allclose(sims[row, : len(want_sims)], want_sims, atol=1e-5)


def test_every_list_probed_is_exact_search(built, keys, queries) -> None:
    built.nprobe, built.k_factor = NLIST, 8
    sims, ids = built.search(queries, 30)
    want_sims, want_ids = ExactIndex(DIM).fill(keys).search(queries, 30)
    assert recall_at_k(ids, want_ids) == 1.0
    assert torch.allclose(sims, want_sims, atol=1e-5)
    naive = (queries @ keys.float().T).gather(1, ids)  # returned sims are exact
    assert torch.allclose(sims, naive, atol=1e-5)


def test_residual_bf16_first_pass_orders_well(built, keys, queries) -> None:
    """k_factor 1 re-scores only the k the bf16 first pass kept: its rounding error is a
    fraction of the residual's norm, so nearly all of the true top 30 survive."""
    built.nprobe, built.k_factor = NLIST, 1
    ids = built.search(queries, 30)[1]
    assert recall_at_k(ids, ExactIndex(DIM).fill(keys).search(queries, 30)[1]) >= 0.97


def test_saved_index_and_split_adds_answer_alike(built, keys, queries, tmp_path) -> None:
    built.nprobe, built.k_factor = 3, 1
    sims, ids = built.search(queries, 30)
    saved = load_index(built.save(tmp_path / "ivf"))
    assert isinstance(saved, MatmulIVFIndex) and saved.params() == built.params()
    assert torch.equal(saved.search(queries, 30)[1], ids)
    split = MatmulIVFIndex(DIM, nlist=NLIST, nprobe=3)
    split.train(keys)
    for part in keys.split(700):
        split.add(part)
        split.search(queries[:2], 5)  # a search between adds sorts what is there in
    sims2, ids2 = split.search(queries, 30)
    assert torch.equal(ids2, ids) and torch.allclose(sims2, sims)


def test_threads_searching_at_once_get_their_own_answers(built, queries) -> None:
    """Scratch buffers are kept between searches, one set per thread: searches from
    several threads at once answer as one thread does."""
    built.nprobe, built.k_factor = 3, 1
    parts = [queries[:50], queries[50:], queries[20:90]]
    want = [built.search(part, 30) for part in parts]
    with ThreadPoolExecutor(3) as pool:
        for _ in range(3):
            got = list(pool.map(lambda part: built.search(part, 30), parts))
            for (sims, ids), (want_sims, want_ids) in zip(got, want):
                assert torch.equal(ids, want_ids) and torch.equal(sims, want_sims)


def test_fewer_candidates_than_k_are_padded(keys) -> None:
    index = MatmulIVFIndex(DIM, nlist=4, nprobe=1, k_factor=1).fill(keys[:40])
    sims, ids = index.search(keys[:3].float(), 60)
    assert ids.shape == (3, 60)
    found = ids >= 0
    assert bool((sims[~found] == float("-inf")).all()) and bool(found[:, 0].all())
    assert all(len(set(r[r >= 0].tolist())) == int((r >= 0).sum()) for r in ids)


def test_tuner_reaches_the_target_at_the_fewest_lists(keys) -> None:
    """The tuner steps nprobe one list at a time (``FINE_NPROBES``): at the kept
    k_factor one list fewer misses the target, and what it records is the held-out
    recall a plain loop measures on the same sample (``_brute_force_recall``)."""
    index = MatmulIVFIndex(DIM, nlist=NLIST, recall=0.95, recall_queries=200, seed=1).fill(keys)
    assert index.measured_recall is not None and index.measured_recall >= 0.95
    assert index.tuned_by == TUNER_VERSION
    got = _brute_force_recall(index, keys, 200, 1)
    assert got == pytest.approx(index.measured_recall, abs=1e-4)
    if index.nprobe > 1:
        fewer = _brute_force_recall(index, keys, 200, 1, nprobe=index.nprobe - 1)
        assert fewer < 0.95


def test_a_cached_index_tuned_by_an_older_tuner_is_rebuilt(keys, tmp_path) -> None:
    def empty() -> MatmulIVFIndex:
        return MatmulIVFIndex(DIM, nlist=NLIST, recall=0.9, recall_queries=100)

    first = load_or_build(empty(), lambda ix: ix.fill(keys), N, tmp_path, "keys-v1")
    assert load_or_build(empty(), pytest.fail, N, tmp_path, "keys-v1").nprobe == first.nprobe
    folder = cache_path(tmp_path, "keys-v1", first)
    meta = json.loads((folder / META_FILE).read_text())
    meta["params"]["tuned_by"] = None  # as saved before the tuner held queries out
    (folder / META_FILE).write_text(json.dumps(meta))
    rebuilt = []
    again = load_or_build(
        empty(), lambda ix: rebuilt.append(ix) or ix.fill(keys), N, tmp_path, "keys-v1"
    )
    assert rebuilt == [again] and again.tuned_by == TUNER_VERSION


def test_float32_keys_stay_float32(queries) -> None:
    keys = clustered_unit_vectors(800, DIM, n_clusters=6, seed=2)
    index = create_index("ivfmm", DIM, nlist=8, nprobe=8, k_factor=4).fill(keys)
    sims, ids = index.search(queries, 5)
    assert torch.allclose(sims, (queries @ keys.T).gather(1, ids), atol=1e-6)


@pytest.mark.parametrize(
    "params", [{"nlist": 0}, {"nprobe": 1.5}, {"k_factor": True}, {"recall": 1.5}]
)
def test_bad_parameters_name_themselves(params) -> None:
    with pytest.raises(InputError, match=next(iter(params))):
        MatmulIVFIndex(DIM, **params)


def test_too_few_training_keys(keys) -> None:
    with pytest.raises(InputError, match="nlist=24"):
        MatmulIVFIndex(DIM, nlist=NLIST).fill(keys[:10])


def test_padded_sizes_are_few_and_close() -> None:
    sizes = [padded_size(n) for n in range(1, 20_000)]
    assert all(s >= n for n, s in zip(range(1, 20_000), sizes))
    assert all(s <= max(16, 1.25 * n) for n, s in zip(range(1, 20_000), sizes))
    assert len(set(sizes)) <= 4 * 11 + 1  # four per octave from 16 to 20k


def test_image_like_queries_come_from_few_blobs() -> None:
    """``clustered_queries`` draws from ``blobs`` of the keys' blob centres: recomputed
    here from the same seed as ``clustered_unit_vectors``, each query's most similar
    centre is one of at most 3 (and the spread keeps it its own blob's)."""
    from hbird.index.synthetic import clustered_queries

    centers = torch.randn(40, DIM, generator=torch.Generator().manual_seed(1234))
    centers = torch.nn.functional.normalize(centers, dim=1)
    queries = clustered_queries(500, DIM, n_clusters=40, blobs=3, spread=0.3)
    nearest = (queries @ centers.T).argmax(dim=1)
    assert len(set(nearest.tolist())) == 3
    assert bool(((queries @ centers.T).max(dim=1).values > 0.9).all())


@pytest.mark.slow
def test_one_image_queries_at_200k_keys_reach_the_tuned_recall() -> None:
    """Tuned for recall@30 0.9 on its own keys (the tuner's sample), a 200k-key index
    answers one image's queries (1024 from 8 of 200 blobs) at >= 0.9 against the
    exact index, with exact sims."""
    from hbird.index.synthetic import clustered_queries

    keys = clustered_unit_vectors(200_000, 128, n_clusters=200, seed=0).half()
    queries = clustered_queries(1024, 128, n_clusters=200, blobs=8)
    tuned = MatmulIVFIndex(128, expected_size=200_000, recall=0.9).fill(keys)
    assert tuned.nlist == 447 and tuned.measured_recall >= 0.9
    want_sims, want_ids = ExactIndex(128).fill(keys).search(queries, 30)
    sims, ids = tuned.search(queries, 30)
    assert recall_at_k(ids, want_ids) >= 0.9
    assert torch.allclose(sims, (queries @ keys.float().T).gather(1, ids), atol=1e-5)
