"""Data-efficiency sweep: seeded subset files, per-run reuse, mean ± std over seeds."""

import csv
import json
import statistics

import pytest

from eval_settings import FAST_PROTOCOL, PREDICTOR_FIELDS
from hbird.data.datasets import create_dataset
from hbird.data.fewshot import fewshot_indices, read_subset
from hbird.errors import InputError
from hbird.eval.fractions import evaluate_fractions, fraction_folder, mean_std
from hbird.predictor import InContextPredictor
from oracles import retrieval_miou

FAST = dict(FAST_PROTOCOL, overlays=0, max_queries=4)
FRACTIONS, SEEDS = ("1/8", "1/2", "1/1"), (1, 2)
PREDICTOR = PREDICTOR_FIELDS


@pytest.fixture(scope="module")
def dataset(folder_dataset):
    return folder_dataset


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, dataset):
    out = tmp_path_factory.mktemp("sweep")
    report = evaluate_fractions(
        "test_vit", dataset, FRACTIONS, SEEDS, out=out, progress=False, **FAST
    )
    return out, report


def test_subset_files_are_seeded(tmp_path, dataset, sweep):
    out, _ = sweep
    names = create_dataset(dataset, split="train").names
    subsets = {}
    for fraction in FRACTIONS:
        for seed in SEEDS:
            path = (
                out / "fractions" / fraction_folder(fraction) / f"seed_{seed}" / "prompt_subset.txt"
            )
            subsets[fraction, seed] = read_subset(path)
            assert subsets[fraction, seed] == [
                names[i] for i in fewshot_indices(20, fraction, seed)
            ]
    assert len(subsets["1/8", 1]) == 3 and len(subsets["1/2", 1]) == 10
    assert subsets["1/8", 1] != subsets["1/8", 2] and subsets["1/2", 1] != subsets["1/2", 2]
    again = tmp_path / "again"
    evaluate_fractions("test_vit", dataset, ["1/8"], [1], out=again, progress=False, **FAST)
    assert (again / "fractions/1_8/seed_1/prompt_subset.txt").read_text() == (
        out / "fractions/1_8/seed_1/prompt_subset.txt"
    ).read_text()


def test_aggregates_are_mean_and_std_of_the_runs(dataset, sweep):
    out, report = sweep
    data = json.loads((out / "data_efficiency.json").read_text())
    assert data["metric"] == "miou" and data["seeds"] == list(SEEDS)
    rows = list(csv.DictReader((out / "data_efficiency.csv").open()))
    for row, fraction in zip(data["fractions"], FRACTIONS):
        per_seed = []
        for seed in SEEDS:
            run = json.loads((out / row["runs"][str(seed)] / "metrics.json").read_text())
            per_seed.append(run["metrics"]["miou"])
        assert row["mean"]["miou"] == pytest.approx(statistics.fmean(per_seed), abs=1e-12)
        assert row["std"]["miou"] == pytest.approx(statistics.stdev(per_seed), abs=1e-12)
        line = next(r for r in rows if r["fraction"] == fraction and r["metric"] == "miou")
        assert float(line["mean"]) == pytest.approx(row["mean"]["miou"])
        assert [float(line[f"seed_{s}"]) for s in SEEDS] == pytest.approx(per_seed)
    half = data["fractions"][1]
    assert half["std"]["miou"] > 0  # different images, different numbers
    full = data["fractions"][2]  # every seed draws all 20 images: one run, std 0
    assert full["runs"] == {"1": "fractions/1_1/seed_1", "2": "fractions/1_1/seed_1"}
    assert full["std"]["miou"] == 0 and not (out / "fractions/1_1/seed_2/bank").exists()
    summary = (out / "summary.md").read_text()
    mean, std = report.rows[1].mean_std("miou")
    assert f"| 1/2 | 10 | {mean:.4f} ± {std:.4f} |" in summary and "hummingbird_lowdata" in summary
    assert (out / "data_efficiency.png").stat().st_size > 1000


def test_runs_are_the_protocol_on_the_subset(dataset, sweep):
    _, report = sweep
    prompt = create_dataset(dataset, split="train").subset(fewshot_indices(20, "1/8", 2))
    queries = create_dataset(dataset, split="val")
    scored = [queries[i] for i in range(FAST["max_queries"])]
    settings = {k: FAST[k] for k in PREDICTOR}
    want = retrieval_miou(prompt, scored, 4, encoder="test_vit", **settings)
    assert report.rows[0].per_seed[2]["miou"] == pytest.approx(want, abs=1e-12)


def test_rerun_reuses_finished_runs(tmp_path, dataset, monkeypatch):
    out = tmp_path / "sweep"
    first = evaluate_fractions("test_vit", dataset, ["1/4"], SEEDS, out=out, progress=False, **FAST)
    manifests = sorted(out.glob("fractions/*/seed_*/bank/manifest.json"))
    assert len(manifests) == 2
    stamps = [p.stat().st_mtime_ns for p in manifests]
    builds = []
    original = InContextPredictor.build_bank
    monkeypatch.setattr(
        InContextPredictor,
        "build_bank",
        lambda self, *a, **k: builds.append(1) or original(self, *a, **k),
    )
    second = evaluate_fractions(
        "test_vit", dataset, ["1/4"], SEEDS, out=out, progress=False, **FAST
    )
    assert builds == [] and [p.stat().st_mtime_ns for p in manifests] == stamps
    assert second.rows[0].per_seed == first.rows[0].per_seed
    # a new fraction in the same folder builds only its own banks
    evaluate_fractions("test_vit", dataset, ["1/4", "1/2"], SEEDS, out=out, progress=False, **FAST)
    assert len(builds) == 2


def test_bad_requests_are_refused(tmp_path, dataset):
    with pytest.raises(InputError, match="seeds must differ"):
        evaluate_fractions("test_vit", dataset, ["1/2"], [1, 1], progress=False, **FAST)
    out = tmp_path / "sweep"
    evaluate_fractions("test_vit", dataset, ["1/8"], [1], out=out, progress=False, **FAST)
    (out / "fractions/1_8/seed_1/prompt_subset.txt").write_text("scene_0000\n")
    with pytest.raises(InputError, match="other prompt images"):
        evaluate_fractions("test_vit", dataset, ["1/8"], [1], out=out, progress=False, **FAST)


def test_mean_std_helper():
    assert mean_std([1.0, 2.0, 4.0]) == pytest.approx((7 / 3, statistics.stdev([1.0, 2.0, 4.0])))
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([0.5, float("nan")]) == (0.5, 0.0)
