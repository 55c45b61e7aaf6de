"""Two CPU processes (gloo) ≡ one process: bank builds, evaluations and sharded search.

The two-rank runs go through the command line as ``torchrun`` starts it (the rank and
the rendezvous in the environment, the group joined by ``hbird.cli``), spawned once for
the module; each test compares what they wrote with a one-process run made here.
"""

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hbird.cli import main
from hbird.data.synthetic import write_scene_folder

# two spawned ranks through four commands: ~1 min alone, ~3 min on a loaded 2-core machine
pytestmark = pytest.mark.slow

FAST = "--task segmentation --encoder test_vit --layers 0 --image-size 64 --quiet".split()
# 20 images x 2 passes = 40 items = two blocks of work; 60-entry shards cut through them
BUILD = [*FAST, "--aug-epochs", "2", "--memory-size", "800", "--shard-size", "60"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_torchrun(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a worker."""
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )


def eval_argv(dataset: str, out: Path, *extra: str) -> list[str]:
    return ["eval", "--encoder", "test_vit", "--dataset", dataset, "--preset", "quick", "--out", str(out),
            "--quiet", "layers=0", "image_size=64", "batch_size=3", *extra]  # fmt: skip


def tied_keys() -> torch.Tensor:
    """``(40, 8)`` unit keys where rows 5, 22 and 31 are one key (ties across both ranks'
    slices, 0..19 and 20..39) and rows 12 and 27 another."""
    keys = torch.nn.functional.normalize(
        torch.randn(40, 8, generator=torch.Generator().manual_seed(3)), dim=1
    )
    keys[22] = keys[31] = keys[5]
    keys[27] = keys[12]
    return keys


def tied_queries() -> torch.Tensor:
    """``(7, 8)``: the tied keys themselves (so the ties are the top scores), and random ones."""
    rand = torch.randn(4, 8, generator=torch.Generator().manual_seed(4))
    return torch.cat([tied_keys()[[5, 12, 22]] * 0.5, rand])


def _sharded_search(root: Path) -> None:
    from hbird.distributed import rank
    from hbird.index import ExactIndex
    from hbird.index.sharded import ShardedIndex, slice_bounds

    keys, queries = tied_keys(), tied_queries()
    start, stop = slice_bounds(len(keys), rank(), 2)
    local = ExactIndex(8)
    local.add(keys[start:stop])
    index = ShardedIndex(local, start, len(keys))
    mine = queries[:5] if rank() == 0 else queries[5:]  # uneven: 5 and 2 queries
    sims, ids = index.search(mine, 6)
    values = torch.arange(stop - start, dtype=torch.float32)[:, None] + start  # value = global id
    fetched = index.fetch(ids, values)
    empty = index.search(queries[:0], 6)  # a rank with no queries still takes part
    torch.save(
        {"sims": sims, "ids": ids, "fetched": fetched, "empty": empty}, root / f"search_{rank()}.pt"
    )


def _two_rank_jobs(rank: int, port: int, root: str, dataset: str) -> None:
    from hbird.distributed import init_from_env

    torch.set_num_threads(1)
    as_torchrun(rank, 2, port)
    init_from_env()  # the group every command below joins (as one torchrun launch has one)
    root = Path(root)
    code = main(
        ["bank", "build", "--prompt", str(root / "prompt"), "--out", str(root / "bank2"), *BUILD]
    )
    assert code == 0, code
    assert main(eval_argv(dataset, root / "eval2")) == 0
    assert main(eval_argv(dataset, root / "eval_resumed")) == 0  # a 1-rank run, resumed on 2
    assert main(eval_argv(dataset, root / "eval_sharded", "--shard-bank", "--index", "exact")) == 0
    sparse = ("--shard-bank", "--index", "exact", "--value-storage", "sparse")
    assert main(eval_argv(dataset, root / "eval_sharded_sparse", *sparse)) == 0
    _sharded_search(root)


def _interrupted_build(rank: int, port: int, root: str) -> None:
    """Rank 0 is stopped before it writes its first part; rank 1 finishes its own."""
    import hbird.distributed.build as build

    torch.set_num_threads(1)
    as_torchrun(rank, 2, port)
    write = build._write_part

    def stop_on_rank0(file, entries):
        if rank == 0:
            raise KeyboardInterrupt
        write(file, entries)

    build._write_part = stop_on_rank0
    code = main(["bank", "build", "--prompt", root + "/prompt", "--out", root + "/killed", *BUILD])
    raise SystemExit(code)  # 130 on rank 0: the spawner then stops rank 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, scenes, folder_dataset):
    prompt, _ = scenes
    root = tmp_path_factory.mktemp("distributed")
    write_scene_folder(root / "prompt", prompt)
    assert main(eval_argv(folder_dataset, root / "eval_resumed", "max_queries=4")) == 0
    mp.spawn(_two_rank_jobs, args=(free_port(), str(root), folder_dataset), nprocs=2, join=True)
    assert (
        main(
            [
                "bank",
                "build",
                "--prompt",
                str(root / "prompt"),
                "--out",
                str(root / "bank1"),
                *BUILD,
            ]
        )
        == 0
    )
    assert main(eval_argv(folder_dataset, root / "eval1")) == 0
    return root


def manifest(bank: Path) -> dict:
    m = json.loads((bank / "manifest.json").read_text())
    m.pop("created")
    return m


def test_two_rank_bank_build_is_byte_identical_to_one_rank(runs):
    one, two = manifest(runs / "bank1"), manifest(runs / "bank2")
    assert len(one["shards"]) >= 3  # shards cut through both ranks' work
    assert two == one  # same entries, order, counts and checksums
    for shard in one["shards"]:
        assert (runs / "bank2" / shard["file"]).read_bytes() == (
            runs / "bank1" / shard["file"]
        ).read_bytes()
    assert sorted(p.name for p in (runs / "bank2").iterdir()) == sorted(
        p.name for p in (runs / "bank1").iterdir()
    )
    assert not (runs / "bank2.partial").exists()


def test_two_rank_build_killed_midway_resumes_on_one_rank(runs):
    with pytest.raises(Exception):  # noqa: B017 - the spawned rank 0 died
        mp.spawn(_interrupted_build, args=(free_port(), str(runs)), nprocs=2, join=True)
    parts = sorted(p.name for p in (runs / "killed.partial" / "parts").iterdir())
    assert parts == ["part_0000001.safetensors"]  # rank 1's block survived, rank 0's did not
    argv = [
        "bank",
        "build",
        "--prompt",
        str(runs / "prompt"),
        "--out",
        str(runs / "killed"),
        *BUILD,
    ]
    assert main(argv) == 0  # one process, no group: resumes the two-rank build
    assert manifest(runs / "killed") == manifest(runs / "bank1")
    assert not (runs / "killed.partial").exists()


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_two_rank_eval_gives_the_one_rank_metrics(runs):
    """8 queries, 3 per rank per step: steps of 6 then 2 (rank 1 idle in the last)."""
    one, two = metrics(runs / "eval1"), metrics(runs / "eval2")
    assert two["metrics"] == one["metrics"] and two["per_class"] == one["per_class"]
    assert two["counts"] == one["counts"] and two["counts"]["queries"] == 8
    progress = json.loads((runs / "eval2" / "progress.json").read_text())
    assert (
        progress["done"] == 8
        and progress["metric"]
        == json.loads((runs / "eval1" / "progress.json").read_text())["metric"]
    )
    assert sorted(p.name for p in (runs / "eval2").iterdir()) == sorted(
        p.name for p in (runs / "eval1").iterdir()
    )


def test_a_one_rank_run_resumes_on_two_ranks(runs):
    assert metrics(runs / "eval_resumed")["metrics"] == metrics(runs / "eval1")["metrics"]


def test_sharded_exact_eval_gives_the_one_process_metrics_and_says_so(runs):
    sharded = metrics(runs / "eval_sharded")
    assert sharded["metrics"] == metrics(runs / "eval1")["metrics"]
    assert (
        sharded["search"]["shards"] == 2
        and sum(sharded["search"]["entries_per_shard"]) == sharded["counts"]["memory_entries"]
    )
    assert "shards 2" in (runs / "eval_sharded" / "summary.md").read_text()


def test_sharded_eval_with_sparse_values_gives_the_dense_metrics(runs):
    """Sparse values are lossless: each rank gathers its neighbours' rows bit for bit."""
    sparse = metrics(runs / "eval_sharded_sparse")
    assert sparse["config"]["value_storage"] == "sparse"
    assert sparse["metrics"] == metrics(runs / "eval_sharded")["metrics"]
    assert sparse["metrics"] == metrics(runs / "eval1")["metrics"]


def test_sharded_exact_search_equals_one_process_exact_search_on_ties(runs):
    """Oracle: every score by a naive loop, sorted by (score desc, id asc) in Python."""
    from hbird.index import ExactIndex

    keys, queries = tied_keys(), tied_queries()
    oracle_ids, oracle_sims = [], []
    for q in queries:
        scored = sorted(
            ((float(q @ key), i) for i, key in enumerate(keys)), key=lambda t: (-t[0], t[1])
        )
        oracle_sims.append([s for s, _ in scored[:6]])
        oracle_ids.append([i for _, i in scored[:6]])
    parts = [torch.load(runs / f"search_{r}.pt") for r in (0, 1)]
    ids = torch.cat([p["ids"] for p in parts])
    sims = torch.cat([p["sims"] for p in parts])
    assert ids.tolist() == oracle_ids  # tied keys 5, 22, 31 (both ranks) come in id order
    assert ids[0, :3].tolist() == [5, 22, 31] and ids[1, :2].tolist() == [12, 27]
    torch.testing.assert_close(sims, torch.tensor(oracle_sims), rtol=0, atol=1e-6)
    single = ExactIndex(8)
    single.add(keys)
    one_sims, one_ids = single.search(queries, 6)
    assert torch.equal(sims, one_sims)  # the very scores of one-process exact search
    assert sorted(map(sorted, ids.tolist())) == sorted(map(sorted, one_ids.tolist()))
    for p in parts:
        assert torch.equal(p["fetched"][..., 0], p["ids"].float())  # each neighbour's own row
        assert p["empty"][0].shape == (0, 6)
