"""faiss backends against the torch ExactIndex oracle."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("faiss")

from hbird.errors import InputError  # noqa: E402
from hbird.index import (  # noqa: E402
    ExactIndex,
    FaissFlatIndex,
    FaissHNSWIndex,
    FaissIVFPQIndex,
    create_index,
    load_index,
    recall_at_k,
)
from hbird.index.faiss_backends import default_nlist, default_pq_m  # noqa: E402
from hbird.index.synthetic import clustered_unit_vectors  # noqa: E402
from oracles import assert_same_neighbours  # noqa: E402

DIM, N, K = 64, 30_000, 30


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP k-means slows down 5-20x when other processes compete for the 2
    cores; one thread keeps this module's time steady on a shared machine."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> dict[str, torch.Tensor]:
    keys = clustered_unit_vectors(N, DIM, n_clusters=50, seed=0)
    queries = clustered_unit_vectors(400, DIM, n_clusters=50, seed=1)
    oracle = ExactIndex(DIM)
    oracle.add(keys)
    sims, ids = oracle.search(queries, K)
    return {"keys": keys, "queries": queries, "sims": sims, "ids": ids}


@pytest.fixture(scope="module")
def ivfpq(data) -> FaissIVFPQIndex:
    index = FaissIVFPQIndex(DIM)
    index.add(data["keys"])  # trains on the first batch
    return index


@pytest.fixture(scope="module")
def hnsw(data) -> FaissHNSWIndex:
    index = FaissHNSWIndex(DIM)
    index.add(data["keys"])
    return index


def _true_sims(keys: torch.Tensor, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Cosine between each query and the keys at ``ids (M, k)`` (all ids valid)."""
    return torch.einsum("md,mkd->mk", queries, keys[ids])


def test_flat_equals_exact() -> None:
    g = torch.Generator().manual_seed(0)
    keys = torch.nn.functional.normalize(torch.randn(3000, 24, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(50, 24, generator=g), dim=1)
    flat, exact = FaissFlatIndex(24), ExactIndex(24, chunk_size=500)
    for index in (flat, exact):
        index.add(keys[:1000])
        index.add(keys[1000:].half())  # float16 accepted (faiss stores float32)
    for k in (1, 17):
        (fs, fi), (es, ei) = flat.search(queries, k), exact.search(queries, k)
        assert fs.dtype == torch.float32 and fi.dtype == torch.int64
        assert_same_neighbours(fs, fi, es, ei, atol=1e-5, rtol=1e-5)


def test_flat_pads_like_exact() -> None:
    keys = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    flat, exact = FaissFlatIndex(8), ExactIndex(8)
    flat.add(keys)
    exact.add(keys)
    (fs, fi), (es, ei) = flat.search(keys, 6), exact.search(keys, 6)
    assert_same_neighbours(fs, fi, es, ei)
    assert bool((fi[:, 4:] == -1).all()) and bool(torch.isneginf(fs[:, 4:]).all())


@pytest.mark.parametrize("name", ["ivfpq", "hnsw"])
def test_default_config_recall_and_exact_sims(request, data, name: str) -> None:
    index = request.getfixturevalue(name)
    sims, ids = index.search(data["queries"], K)
    recall = recall_at_k(ids, data["ids"])
    assert recall >= 0.9, f"{name} recall@{K} = {recall:.3f}"
    assert bool((ids >= 0).all())
    assert bool((sims[:, :-1] >= sims[:, 1:]).all())
    # refine (ivfpq) and flat storage (hnsw) make returned sims exact cosines
    torch.testing.assert_close(
        sims, _true_sims(data["keys"], data["queries"], ids), atol=1e-5, rtol=0
    )


def test_ivfpq_first_pass_alone_is_worse(data, ivfpq) -> None:
    """The refine stage matters: without generous re-ranking recall drops."""
    default = ivfpq.k_factor
    ivfpq.k_factor = 1
    try:
        _, ids = ivfpq.search(data["queries"], K)
    finally:
        ivfpq.k_factor = default
    assert recall_at_k(ids, data["ids"]) < recall_at_k(
        ivfpq.search(data["queries"], K)[1], data["ids"]
    )


def test_ivfpq_training_defaults(ivfpq) -> None:
    assert ivfpq.is_trained and ivfpq.ntotal == N
    assert ivfpq.nlist == default_nlist(N) == round(4 * N**0.5)
    assert ivfpq.m == default_pq_m(DIM) == DIM  # one 4-bit codebook per dimension
    info = ivfpq.describe()
    assert info["kind"] == "ivfpq" and info["factory"] == f"IVF{ivfpq.nlist},PQ64x4fs,RFlat"
    assert default_nlist(1000) == 1000 // 39  # small sets: >= 39 points per centroid


def test_ivfpq_explicit_train_then_several_adds(data) -> None:
    keys = data["keys"][:5000]
    index = create_index("ivfpq", DIM, expected_size=20_000, nprobe=8)
    assert not index.is_trained and index.ntotal == 0
    index.train(keys[:3000])
    assert index.is_trained and index.nlist == default_nlist(20_000) and index.ntotal == 0
    index.add(keys[:2000])
    index.add(keys[2000:].half())
    assert index.ntotal == 5000
    probe = torch.tensor([0, 1999, 2000, 4999])
    _, ids = index.search(keys[probe], 1)  # each key finds itself at its insertion id
    assert torch.equal(ids[:, 0], probe)
    with pytest.raises(InputError, match="already holds 5000 keys"):
        index.train(keys)


def test_ivfpq_training_sample_is_seeded_subset(data) -> None:
    keys = data["keys"]
    index = FaissIVFPQIndex(DIM, nlist=100, seed=3)
    sample = index._training_sample(keys)
    assert sample.shape == (6400, DIM)  # 64 points per list
    assert torch.equal(sample, FaissIVFPQIndex(DIM, nlist=100, seed=3)._training_sample(keys))
    assert not torch.equal(sample, FaissIVFPQIndex(DIM, nlist=100, seed=4)._training_sample(keys))
    assert FaissIVFPQIndex(DIM, nlist=100, train_size=500)._training_sample(keys).shape[0] == 500
    rows = (sample @ keys.T).argmax(dim=1)  # every sampled row is one of the keys
    assert torch.equal(keys[rows], sample)


def test_ivfpq_too_little_training_data() -> None:
    index = FaissIVFPQIndex(16, nlist=100)
    with pytest.raises(InputError, match="at least 100 vectors"):
        index.add(torch.nn.functional.normalize(torch.randn(50, 16), dim=1))
    assert index.ntotal == 0 and not index.is_trained
    with pytest.raises(InputError, match="must divide"):
        FaissIVFPQIndex(16, m=5)


@pytest.mark.parametrize("index_kind", ["ivfpq", "hnsw"])
def test_k_beyond_candidates_is_padded(index_kind: str) -> None:
    keys = clustered_unit_vectors(800, 16, n_clusters=5)
    index = create_index(index_kind, 16)
    index.add(keys)
    sims, ids = index.search(keys[:3], 1000)
    assert sims.shape == ids.shape == (3, 1000)
    assert bool((ids[:, 800:] == -1).all())
    assert bool(torch.isneginf(sims[ids < 0]).all())
    assert bool(torch.isfinite(sims[ids >= 0]).all())


def test_hnsw_multiple_adds_and_params(data) -> None:
    keys = data["keys"][:3000]
    index = FaissHNSWIndex(DIM, m=16, ef_construction=40, ef_search=32)
    index.add(keys[:1000])
    index.add(keys[1000:])
    probe = torch.tensor([0, 999, 1000, 2999])
    assert torch.equal(index.search(keys[probe], 1)[1][:, 0], probe)
    assert index.describe() == {
        "kind": "hnsw",
        "dim": DIM,
        "ntotal": 3000,
        "is_trained": True,
        "m": 16,
        "ef_construction": 40,
        "ef_search": 32,
    }


@pytest.mark.parametrize("name", ["flat", "ivfpq", "hnsw"])
def test_save_load_identical_results(tmp_path, data, request, name: str) -> None:
    if name == "flat":
        index = FaissFlatIndex(DIM)
        index.add(data["keys"][:5000])
    else:
        index = request.getfixturevalue(name)
    queries = data["queries"][:50]
    path = index.save(tmp_path / name)
    loaded = load_index(path)
    assert type(loaded) is type(index)
    assert loaded.describe() == index.describe()
    for got, want in zip(loaded.search(queries, K), index.search(queries, K)):
        assert torch.equal(got, want)


def test_save_load_untrained_ivfpq(tmp_path) -> None:
    index = FaissIVFPQIndex(16, nprobe=3)
    loaded = load_index(index.save(tmp_path / "empty"))
    assert isinstance(loaded, FaissIVFPQIndex)
    assert loaded.ntotal == 0 and not loaded.is_trained and loaded.nprobe == 3


def test_dim_mismatch(ivfpq) -> None:
    with pytest.raises(InputError, match="dimension 32 .*dim=64"):
        ivfpq.search(torch.zeros(2, 32), 5)
    with pytest.raises(InputError, match="dimension 32 .*dim=64"):
        FaissFlatIndex(DIM).add(torch.zeros(2, 32))


def test_ivfpq_float16_keys_refine_in_float16_exactly_at_half_the_size(tmp_path, data) -> None:
    keys16, queries = data["keys"][:8000].half(), data["queries"][:100]
    half = FaissIVFPQIndex(DIM)
    half.add(keys16)
    assert half.refine == "float16" and half.factory_string.endswith(",Refine(SQfp16)")
    full = FaissIVFPQIndex(DIM, refine="float32")
    full.add(keys16)
    assert full.factory_string.endswith(",RFlat")
    sims, ids = half.search(queries, K)
    # the float16 copy holds float16 keys exactly: sims are the keys' exact cosines
    torch.testing.assert_close(sims, _true_sims(keys16.float(), queries, ids), atol=1e-5, rtol=0)
    oracle = ExactIndex(DIM)
    oracle.add(keys16)
    assert recall_at_k(ids, oracle.search(queries, K)[1]) >= 0.9
    assert_same_neighbours(sims, ids, *full.search(queries, K))  # same candidates, same scores
    half_bytes = (half.save(tmp_path / "half") / "index.faiss").stat().st_size
    full_bytes = (full.save(tmp_path / "full") / "index.faiss").stat().st_size
    assert half_bytes < 0.7 * full_bytes
    reloaded = load_index(tmp_path / "half")
    assert reloaded.refine == "float16" and torch.equal(reloaded.search(queries, K)[1], ids)
    with pytest.raises(InputError, match="refine"):
        FaissIVFPQIndex(DIM, refine="int8")


def test_fill_in_chunks_equals_one_add_and_shows_progress(data, capsys) -> None:
    keys, queries = data["keys"][:6000], data["queries"][:50]
    whole = FaissIVFPQIndex(DIM)
    whole.add(keys)  # trains on this (only) batch: all keys
    chunked = FaissIVFPQIndex(DIM).fill(keys, chunk_size=1000, progress=True)
    said = capsys.readouterr().err
    assert "training the ivfpq index on 6,000 keys" in said and "indexing (ivfpq)" in said
    assert chunked.ntotal == 6000 and chunked.nlist == whole.nlist
    assert all(
        torch.equal(a, b) for a, b in zip(chunked.search(queries, K), whole.search(queries, K))
    )
    exact_chunked, exact_whole = ExactIndex(DIM).fill(keys, chunk_size=1000), ExactIndex(DIM)
    exact_whole.add(keys)
    assert_same_neighbours(*exact_chunked.search(queries, K), *exact_whole.search(queries, K))


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw", "flat"])
def test_fill_from_pieces_equals_fill(data, kind) -> None:
    """Streaming fill (one pass for the training sample, one to add) builds the same index."""
    keys, queries = data["keys"][:20_000].half(), data["queries"][:50]
    options = {"train_size": 3000} if kind == "ivfpq" else {}  # a sample smaller than N
    whole = create_index(kind, DIM, expected_size=20_000, **options).fill(keys)
    passes = []

    def pieces():
        passes.append(1)
        return (keys[i : i + 7000] for i in range(0, 20_000, 7000))  # uneven last piece

    streamed = create_index(kind, DIM, expected_size=20_000, **options).fill_from(pieces, 20_000)
    assert len(passes) == (2 if kind == "ivfpq" else 1)
    assert streamed.ntotal == 20_000
    for a, b in zip(streamed.search(queries, K), whole.search(queries, K)):
        assert torch.equal(a, b)


def test_float16_copy_of_float32_keys_does_not_claim_exact_scores(tmp_path, data) -> None:
    keys, queries = data["keys"][:5000], data["queries"][:20]  # float32 keys
    approximate = FaissIVFPQIndex(DIM, refine="float16")
    approximate.add(keys)
    assert approximate.keys_dtype == "float32" and not approximate.exact_scores
    sims, ids = approximate.search(queries, K)
    error = (sims - _true_sims(keys, queries, ids)).abs().max()
    assert 0 < error < 1e-2  # close, but not the stored keys' exact inner products
    reloaded = load_index(approximate.save(tmp_path / "idx"))
    assert not reloaded.exact_scores
    exact = FaissIVFPQIndex(DIM)
    exact.add(keys)
    assert exact.exact_scores and load_index(exact.save(tmp_path / "idx2")).exact_scores


@pytest.mark.parametrize(("chunk_size", "k"), [(16384, 30), (700, 30), (20, 30)])
def test_exact_faiss_backend_equals_torch_oracle(chunk_size: int, k: int) -> None:
    """ExactIndex(backend="faiss") against the torch path and a full matmul + topk:
    identical neighbours up to exact ties (duplicated keys), scores to float32 rounding.
    ``chunk_size`` 20 < k: a chunk holds fewer keys than wanted neighbours."""
    g = torch.Generator().manual_seed(5)
    keys = torch.nn.functional.normalize(torch.randn(4000, 48, generator=g), dim=1).half()
    keys[1::4] = keys[0::4]  # exact ties
    queries = torch.nn.functional.normalize(torch.randn(900, 48, generator=g), dim=1)
    torch_index = ExactIndex(48, chunk_size=chunk_size, query_chunk_size=400)
    faiss_index = ExactIndex(48, chunk_size=chunk_size, query_chunk_size=400, backend="faiss")
    for index in (torch_index, faiss_index):
        index.add(keys[:2500])
        index.add(keys[2500:].float())  # a float32 block next to a float16 one
    sims, ids = faiss_index.search(queries, k)
    want_sims, want_ids = torch_index.search(queries, k)
    assert sims.dtype == torch.float32 and ids.dtype == torch.int64
    assert_same_neighbours(sims, ids, want_sims, want_ids, atol=1e-5, rtol=1e-5)
    full_sims, full_ids = (queries @ keys.float().T).topk(k, dim=1)
    assert_same_neighbours(sims, ids, full_sims, full_ids, atol=1e-5, rtol=1e-5)


def test_exact_faiss_backend_pads_saves_and_checks_options(tmp_path) -> None:
    keys = torch.nn.functional.normalize(torch.randn(5, 8), dim=1)
    index = ExactIndex(8, backend="faiss")
    index.add(keys)
    sims, ids = index.search(keys, 7)
    want_sims, want_ids = ExactIndex(8).fill(keys).search(keys, 7)
    assert_same_neighbours(sims, ids, want_sims, want_ids)
    assert bool((ids[:, 5:] == -1).all()) and torch.equal(ids[:, 0], torch.arange(5))
    loaded = load_index(index.save(tmp_path / "idx"))
    assert isinstance(loaded, ExactIndex) and loaded.backend == "faiss"
    with pytest.raises(InputError, match="backend must be"):
        ExactIndex(8, backend="numpy")
    with pytest.raises(InputError, match="on the CPU"):
        ExactIndex(8, backend="faiss", device="cuda")


@pytest.mark.parametrize(
    ("options", "factory"),
    [
        ({"rotation": "rr"}, "RR64,IVF64,PQ64x4fs,RFlat"),
        ({"rotation": "pcar"}, "PCAR64,IVF64,PQ64x4fs,RFlat"),
        ({"coarse": "hnsw"}, "IVF64_HNSW32,PQ64x4fs,RFlat"),
    ],
)
def test_ivfpq_rotations_and_hnsw_coarse_against_exact(data, options, factory) -> None:
    """A rotation before IVF-PQ or an HNSW coarse quantiser changes the first pass only:
    re-ranking still scores the keys as given (exact cosines), and recall stays high."""
    keys, queries = data["keys"][:8000], data["queries"]
    index = FaissIVFPQIndex(DIM, nlist=64, nprobe=16, train_size=4096, **options)
    index.fill(keys)
    assert index.describe()["factory"] == factory
    sims, ids = index.search(queries, K)
    assert recall_at_k(ids, (queries @ keys.T).topk(K, dim=1).indices) >= 0.9
    torch.testing.assert_close(sims, _true_sims(keys, queries, ids), atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="rotation must be"):
        FaissIVFPQIndex(DIM, rotation="opq")
    with pytest.raises(InputError, match="coarse must be"):
        FaissIVFPQIndex(DIM, coarse="ivf")


def test_ivfpq_by_residual_codes_offsets_and_survives_reload(tmp_path, data) -> None:
    """``by_residual`` reaches the faiss object, and on clustered keys coding each key's
    offset from its list centroid ranks better than coding the key itself: with no extra
    candidates (``k_factor`` 1) more of the exact top-k survive the 4-bit first pass.
    Re-ranking keeps the returned sims exact either way. An ``index.json`` written before
    the option existed reports what its payload holds."""
    import faiss

    keys, queries = data["keys"][:8000], data["queries"]
    truth = (queries @ keys.T).topk(K, dim=1).indices  # naive exact oracle
    recalls = {}
    for by_residual in (True, False):
        index = FaissIVFPQIndex(
            DIM, nlist=64, nprobe=8, k_factor=1, train_size=4096, by_residual=by_residual
        )
        index.fill(keys)
        assert bool(faiss.extract_index_ivf(index._index).by_residual) is by_residual
        sims, ids = index.search(queries, K)
        torch.testing.assert_close(sims, _true_sims(keys, queries, ids), atol=1e-5, rtol=0)
        recalls[by_residual] = recall_at_k(ids, truth)
        folder = index.save(tmp_path / str(by_residual))
        meta = json.loads((folder / "index.json").read_text())
        del meta["params"]["by_residual"]  # as saved before the option existed
        (folder / "index.json").write_text(json.dumps(meta))
        reloaded = load_index(folder)
        assert reloaded.by_residual is by_residual
        assert torch.equal(reloaded.search(queries, K)[1], ids)
    assert recalls[True] > recalls[False] + 0.05, recalls  # measured 0.893 against 0.808
    assert FaissIVFPQIndex(DIM).by_residual is True
    with pytest.raises(InputError, match="by_residual must be"):
        FaissIVFPQIndex(DIM, by_residual="yes")
