"""Fast adaptation: retrieval with growing memories against the linear probe's epochs."""

import csv
import json
import time

import pytest

from eval_settings import FAST_PROTOCOL, PREDICTOR_FIELDS
from hbird.data.datasets import create_dataset
from hbird.data.fewshot import fewshot_indices
from hbird.errors import InputError
from hbird.eval.fast_adaptation import fast_adaptation
from oracles import retrieval_miou

FAST = dict(FAST_PROTOCOL, overlays=0, max_queries=4)
PREDICTOR = PREDICTOR_FIELDS
SWEEP = dict(fractions=("1/8", "1/4", "1/2"), linear_epochs=(1, 3), lr=0.1, patch_batch_size=128)


@pytest.fixture(scope="module")
def dataset(folder_dataset):
    return folder_dataset


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("fast")
    start = time.perf_counter()
    report = fast_adaptation("test_vit", dataset, out=out, progress=False, **SWEEP, **FAST)
    return out, report, time.perf_counter() - start


def test_timings_are_seconds_within_the_sweeps_wall_clock(sweep):
    _, report, wall = sweep
    # every point is timed once, one after the other, inside the call: the timings are
    # positive and together take less than the call did (a unit slip or a timer that
    # keeps running across points adds up to more)
    timed = [(p.adapt_seconds, p.eval_seconds) for p in report.points]
    assert all(a > 0 and e > 0 for a, e in timed)
    assert sum(a + e for a, e in timed) < wall


def test_writes_curves_and_memory_grows(dataset, sweep):
    out, report, _ = sweep
    for name in (
        "fast_adaptation.json",
        "fast_adaptation.csv",
        "fast_adaptation.png",
        "fast_adaptation_fraction.png",
        "summary.md",
    ):
        assert (out / name).is_file(), name
    retrieval = [p for p in report.points if p.method == "retrieval"]
    assert [p.fraction for p in retrieval] == ["1/8", "1/4", "1/2"]
    assert [p.prompt_images for p in retrieval] == [3, 5, 10]
    assert [p.entries for p in retrieval] == [240, 400, 800]  # 80 patches per image, no budget
    linear = {(p.fraction, p.epochs): p for p in report.points if p.method == "linear"}
    assert set(linear) == {("1/8", 3), ("1/4", 3), ("1/2", 3), ("1/1", 1), ("1/1", 3)}
    assert linear["1/1", 3].entries == 1600 and linear["1/1", 3].prompt_images == 20
    assert all(p.metrics["miou"] > 0.6 for p in report.points)
    rows = list(csv.DictReader((out / "fast_adaptation.csv").open()))
    assert len(rows) == len(report.points) and float(rows[0]["miou"]) == pytest.approx(
        retrieval[0].metrics["miou"]
    )
    summary = (out / "summary.md").read_text()
    assert (
        "| retrieval | 1/2 | 10 | 800 |" in summary
        and "| linear | 1/1 | 20 | 1600 | 1 |" in summary
    )


def test_retrieval_points_are_the_protocol_on_the_subset(dataset, sweep):
    _, report, _ = sweep
    prompt = create_dataset(dataset, split="train").subset(fewshot_indices(20, "1/4", 42))
    queries = create_dataset(dataset, split="val")
    scored = [queries[i] for i in range(FAST["max_queries"])]
    settings = {k: FAST[k] for k in PREDICTOR}
    want = retrieval_miou(prompt, scored, 4, encoder="test_vit", **settings)
    point = next(p for p in report.points if p.method == "retrieval" and p.fraction == "1/4")
    assert point.metrics["miou"] == pytest.approx(want, abs=1e-12)


def test_rerun_keeps_finished_points_and_refuses_other_settings(tmp_path, dataset):
    out = tmp_path / "fast"
    first = fast_adaptation(
        "test_vit",
        dataset,
        out=out,
        progress=False,
        compare_linear=False,
        fractions=("1/8", "1/4"),
        **FAST,
    )
    assert {p.method for p in first.points} == {"retrieval"}
    second = fast_adaptation(
        "test_vit",
        dataset,
        out=out,
        progress=False,
        compare_linear=False,
        fractions=("1/8", "1/4", "1/2"),
        **FAST,
    )
    # timings are measured once: identical seconds prove the points were reused, not re-run
    assert [p.adapt_seconds for p in second.points[:2]] == [p.adapt_seconds for p in first.points]
    assert len(second.points) == 3
    saved = json.loads((out / "fast_adaptation.json").read_text())
    assert [p["fraction"] for p in saved["points"]] == ["1/8", "1/4", "1/2"]
    with pytest.raises(InputError, match="other settings"):
        fast_adaptation(
            "test_vit",
            dataset,
            out=out,
            progress=False,
            compare_linear=False,
            fractions=("1/8",),
            **dict(FAST, k=5),
        )


WARM_UP_CHECK = """
import json
import sys
from hbird.data.fewshot import fewshot_indices
from hbird.eval.fast_adaptation.points import Adaptation, linear_point, retrieval_point, warm_up
from hbird.eval.inputs import load_encoder, prepare
from hbird.eval.linear_probe import ProbeSettings, extract_patch_table

cfg, prompt, queries, _ = prepare("test_vit", sys.argv[1], None, None, dict(
    layers=0, image_size=64, k=10, memory_size=None, aug_epochs=1, batch_size=4, overlays=0, max_queries=2))
shared = Adaptation(load_encoder("test_vit", cfg), prompt, queries, cfg, progress=False)
probe = ProbeSettings(epochs=1, lr=0.1, patch_batch_size=128)
if sys.argv[2] == "warm":
    warm_up(shared, probe)
before = set(sys.modules)
indices = fewshot_indices(len(prompt), "1/4", 42)
retrieval_point(shared, "1/4", indices)
table = extract_patch_table(shared.model, prompt, prompt.label_spec, cfg, "float16", False)
linear_point(shared, table, "1/4", indices, probe)
print(json.dumps(sorted(m for m in set(sys.modules) - before if not m.startswith("_"))))
"""


def test_warm_up_runs_what_the_first_points_run(dataset):
    """In a fresh process, the first timed points import nothing after the warm-up; without
    it they import faiss (the first index build), whose import was timed as adaptation."""
    import os
    import subprocess
    import sys

    pytest.importorskip("faiss")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def new_modules(mode):
        command = [sys.executable, "-c", WARM_UP_CHECK, dataset, mode]
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout.strip().splitlines()[-1])

    assert "faiss" in new_modules("cold")
    assert new_modules("warm") == []
