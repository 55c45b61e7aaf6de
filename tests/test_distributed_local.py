"""The distributed layer's pieces in one process (fast; the two-rank runs are in
``test_distributed.py``): top-k merging, bank slices, the sharding report, spread."""

import torch

from hbird import distributed
from hbird.cli import main
from hbird.index.sharded import merge_top_k, slice_bounds
from hbird.memory.bank import MemoryBank


def test_merge_keeps_the_best_scores_and_breaks_ties_by_the_smaller_id():
    """Hand-made: two ranks' lists for one query, a tie at 0.5 between ids 9 and 2."""
    sims = torch.tensor([[0.9, 0.5, -float("inf"), 0.7, 0.5, 0.1]])
    ids = torch.tensor([[4, 9, -1, 7, 2, 3]])
    top_sims, top_ids = merge_top_k(sims, ids, 4)
    assert top_ids.tolist() == [[4, 7, 2, 9]]
    assert torch.equal(top_sims, torch.tensor([[0.9, 0.7, 0.5, 0.5]]))
    _, with_padding = merge_top_k(sims, ids, 6)
    assert with_padding.tolist() == [[4, 7, 2, 9, 3, -1]]  # the empty slot last


def test_slices_cover_every_row_once_and_differ_by_at_most_one():
    for n, world in [(10, 3), (7, 4), (3, 5), (0, 2)]:
        bounds = [slice_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        sizes = [b - a for a, b in bounds]
        assert max(sizes) - min(sizes) <= 1


def test_a_bank_slice_holds_those_rows_of_the_whole_bank(tmp_path):
    from hbird.labelspec import LabelSpec

    bank = MemoryBank(4, LabelSpec(task="segmentation", num_classes=3), {"name": "x"})
    bank.append(torch.randn(23, 4), torch.rand(23, 3))
    bank.save(tmp_path / "bank", shard_size=5)  # shards of 5 rows: a slice cuts through them
    whole = MemoryBank.load(tmp_path / "bank")
    for rows in [(0, 23), (3, 12), (10, 15), (22, 23)]:
        part = MemoryBank.load(tmp_path / "bank", rows=rows)
        assert torch.equal(part.keys, whole.keys[rows[0] : rows[1]])
        assert torch.equal(part.values, whole.values[rows[0] : rows[1]])


def test_bank_info_says_how_the_bank_splits(tmp_path, capsys):
    from hbird.labelspec import LabelSpec

    encoder = {"name": "x", "config_hash": "c", "weights_hash": "w"}
    bank = MemoryBank(4, LabelSpec(task="segmentation", num_classes=3), encoder)
    bank.append(torch.randn(10, 4), torch.rand(10, 3))
    bank.save(tmp_path / "bank", shard_size=4)  # shards: rows 0-3, 4-7, 8-9
    assert main(["bank", "info", str(tmp_path / "bank"), "--shards", "3"]) == 0
    out = capsys.readouterr().out
    # 10 rows over 3 ranks: 0..3, 3..6, 6..10; a row is 4·2 (float16 key) + 3·4 bytes
    assert "rank 0   rows 0..3 (3 entries, 0.0 MiB) from 1 shard file(s)" in out
    assert "rank 1   rows 3..6 (3 entries" in out and "rank 2   rows 6..10 (4 entries" in out
    assert out.count("from 2 shard file(s)") == 2


def test_without_a_group_the_layer_is_a_world_of_one():
    from hbird.metrics import ConfusionMatrix

    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    metric = ConfusionMatrix(3)
    metric.update(torch.tensor([[0, 1]]), torch.tensor([[0, 2]]))
    state = distributed.sum_metric_state(metric)
    assert torch.equal(state["matrix"], metric.matrix)
    calls = []
    results = distributed.spread([lambda i=i: calls.append(i) or i * i for i in range(3)])
    assert next(results) == 0 and calls == [0]  # one by one: a sweep saves after each
    assert list(results) == [1, 4]
