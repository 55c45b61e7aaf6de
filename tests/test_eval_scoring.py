"""The one scoring loop: any metric with update/state_dict/load_state_dict, resumable."""

import json

import torch

from hbird.eval.scoring import in_memory, score_queries
from hbird.metrics import ConfusionMatrix, DepthMetrics, StreamingMetric


class AbsoluteError:
    """A metric outside hbird.metrics: the sum of |prediction - target| and the pixel count."""

    def __init__(self) -> None:
        self.total, self.pixels = 0.0, 0

    def update(self, prediction, target) -> None:
        self.total += float((prediction - target).abs().sum())
        self.pixels += target.numel()

    def state_dict(self):
        return {"total": self.total, "pixels": self.pixels}

    def load_state_dict(self, state) -> None:
        self.total, self.pixels = state["total"], state["pixels"]


def depth_queries(n=7):
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 4, 5, generator=gen) for _ in range(n)]
    depths = [torch.rand(4, 5, generator=gen) * 9 + 0.5 for _ in range(n)]
    return in_memory(images, depths)


def mean_colour(images):
    """A deterministic 'depth': the image's mean over channels, times 10."""
    return [x.mean(0) * 10 for x in images]


class Interrupt(Exception):
    pass


def interrupted_after(calls):
    """``mean_colour`` that fails on call number ``calls + 1``; counts the images it saw."""
    seen = []

    def predict(images):
        if len(seen) == calls:
            raise Interrupt
        seen.append(len(images))
        return mean_colour(images)

    return predict, seen


def test_a_foreign_metric_plugs_in_and_matches_the_hand_sum():
    queries = in_memory(
        [torch.zeros(3, 2, 2)] * 3, [torch.full((2, 2), float(i)) for i in range(3)]
    )
    metric = AbsoluteError()
    assert isinstance(metric, StreamingMetric)
    scored = score_queries(
        lambda ims: [torch.zeros(2, 2) for _ in ims], queries, metric, batch_size=2, progress=False
    )
    # |0 - 0|·4 + |0 - 1|·4 + |0 - 2|·4 = 12 over 12 pixels
    assert scored.done == 3 and (metric.total, metric.pixels) == (12.0, 12)
    assert {"loading", "scoring"} <= set(scored.seconds)


def test_resumed_run_equals_one_pass_of_plain_updates(tmp_path):
    queries = depth_queries()
    oracle = DepthMetrics()
    for q, p in zip(queries, mean_colour([q.image for q in queries])):
        oracle.update(p, q.label)

    def run(calls, build):
        predict, seen = interrupted_after(calls)
        options = dict(batch_size=2, progress_file=tmp_path / "progress.json", progress=False)
        try:
            return score_queries(
                predict, queries, DepthMetrics(), extra={"build": build}, **options
            ), seen
        except Interrupt:
            return None, seen

    first, seen = run(2, build=1.5)
    assert first is None and seen == [2, 2]
    assert json.loads((tmp_path / "progress.json").read_text())["done"] == 4
    resumed, seen = run(99, build=9.0)
    assert seen == [2, 1]  # only the three queries the first run did not finish
    assert resumed.done == 7 and resumed.extra == {"build": 1.5}  # the first run's values
    state, expected = resumed.metric.state_dict(), oracle.state_dict()
    assert torch.equal(state["pixel_sums"], expected["pixel_sums"])  # float64, exact
    assert torch.equal(state["image_sums"], expected["image_sums"])
    assert state["num_images"] == 7


def test_overlays_are_drawn_for_the_first_queries_once(tmp_path):
    labels = [torch.tensor([[0, 1], [1, 255]]) for _ in range(5)]
    queries = in_memory([torch.zeros(3, 2, 2)] * 5, labels)
    drawn = []

    def overlay(query, prediction):
        drawn.append(query.name)
        return f"pictures/{query.name}.png"

    progress_file = tmp_path / "progress.json"
    predict = lambda ims: [torch.ones(2, 2, dtype=torch.int64) for _ in ims]  # noqa: E731
    first = score_queries(
        predict,
        queries,
        ConfusionMatrix(2),
        batch_size=2,
        limit=2,
        overlay=overlay,
        overlays=3,
        progress_file=progress_file,
        progress=False,
    )
    second = score_queries(
        predict,
        queries,
        ConfusionMatrix(2),
        batch_size=2,
        overlay=overlay,
        overlays=3,
        progress_file=progress_file,
        progress=False,
    )
    assert first.overlays == ["pictures/query_0000.png", "pictures/query_0001.png"]
    assert drawn == ["query_0000", "query_0001", "query_0002"]
    assert second.overlays == [f"pictures/query_000{i}.png" for i in range(3)]
    # every query predicts class 1 everywhere: per query, one pixel of class 0 and two of
    # class 1 are labelled (255 is ignored) → row 0 = [0, 5], row 1 = [0, 10]
    assert second.metric.matrix.tolist() == [[0, 5], [0, 10]]
