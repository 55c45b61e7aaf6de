"""The retrieval protocol end to end on a synthetic folder dataset with test_vit."""

import dataclasses
import json

import numpy as np
import pytest

from eval_settings import FAST_PROTOCOL
from hbird.data.datasets import create_dataset
from hbird.errors import InputError
from hbird.eval import evaluate, parse_overrides, resolve_config

FAST = dict(FAST_PROTOCOL, overlays=3)


@pytest.fixture(scope="module")
def dataset(folder_dataset):
    return folder_dataset


def test_presets_and_overrides():
    cfg = resolve_config("hummingbird")
    assert (cfg.memory_size, cfg.k, cfg.temperature, cfg.aug_epochs, cfg.image_size) == (
        10_240_000,
        30,
        0.02,
        2,
        512,
    )
    low = resolve_config(
        "hummingbird_lowdata", parse_overrides(["k=50", "memory_size=null", "layers=8,9"])
    )
    assert (low.k, low.temperature, low.aug_epochs, low.memory_size, low.layers) == (
        50,
        0.1,
        8,
        None,
        (8, 9),
    )
    with pytest.raises(InputError, match="unknown setting"):
        parse_overrides(["kk=3"])


def test_bf16_preset_is_hummingbird_with_bf16_autocast():
    """The cheaper named preset changes one setting of the paper's (Table 6) and no other."""
    paper, bf16 = resolve_config("hummingbird"), resolve_config("hummingbird_bf16")
    assert paper.autocast is None and bf16.autocast == "bf16"
    assert dataclasses.replace(bf16, autocast=None) == paper


def test_eval_writes_every_report_file(tmp_path, dataset):
    out = tmp_path / "run"
    report = evaluate("test_vit", dataset, out=out, progress=False, **dict(FAST, index="auto"))
    assert report.metrics["miou"] > 0.7
    for name in ("config.json", "metrics.json", "per_class.csv", "summary.md"):
        assert (out / name).is_file(), name
    assert len(list((out / "pictures").glob("*.png"))) == 3
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["metrics"]["miou"] == pytest.approx(report.metrics["miou"])
    assert saved["counts"] == {
        "prompt_images": 20,
        "memory_entries": report.counts["memory_entries"],
        "queries": 8,
    }
    # the index actually searched is on record: auto is exact up to 20k entries on a CPU
    # (docs/evaluation.md), and this bank has 20 images x 80 patches
    assert report.counts["memory_entries"] == 1600
    assert saved["search"]["kind"] == report.search["kind"] == "exact"
    assert saved["search"]["ntotal"] == report.counts["memory_entries"]
    summary = (out / "summary.md").read_text()
    assert "no Hungarian matching" in summary and "| miou |" in summary
    assert "index auto → exact, layers 0" in summary
    assert (out / "per_class.csv").read_text().splitlines()[0] == "class,iou,precision,recall"


def test_auto_above_the_exact_limit_searches_with_ivfpq(dataset, monkeypatch):
    pytest.importorskip("faiss")
    import hbird.index

    monkeypatch.setattr(hbird.index, "AUTO_EXACT_MAX", 1000)  # below this bank's 1600 entries
    report = evaluate(
        "test_vit", dataset, progress=False, **dict(FAST, index="auto", max_queries=1)
    )
    assert report.search["kind"] == "ivfpq" and report.search["ntotal"] == 1600


def test_summary_names_what_auto_resolved_to():
    from hbird.eval.report import search_text

    built = {
        "kind": "ivfpq",
        "dim": 8,
        "ntotal": 50_000,
        "is_trained": True,
        "nlist": 894,
        "nprobe": 32,
        "k_factor": 32,
        "expected_size": 50_000,
        "seed": 0,
    }
    assert search_text("auto", built) == "auto → ivfpq (nlist 894, nprobe 32, k_factor 32)"
    assert search_text("exact", {"kind": "exact", "chunk_size": 16384}) == "exact"
    assert search_text("auto", {}) == "auto"


def test_interrupted_run_resumes_to_the_same_numbers(tmp_path, dataset):
    straight = evaluate("test_vit", dataset, progress=False, **FAST)
    out = tmp_path / "run"
    first = evaluate("test_vit", dataset, out=out, progress=False, **dict(FAST, max_queries=4))
    assert first.counts["queries"] == 4
    state = json.loads((out / "progress.json").read_text())
    assert state["done"] == 4
    resumed = evaluate("test_vit", dataset, out=out, progress=False, **FAST)
    assert resumed.counts["queries"] == 8
    assert resumed.metrics["miou"] == pytest.approx(straight.metrics["miou"], abs=1e-12)


def test_run_folder_refuses_other_settings(tmp_path, dataset):
    out = tmp_path / "run"
    evaluate("test_vit", dataset, out=out, progress=False, **dict(FAST, max_queries=2))
    with pytest.raises(InputError, match="k differ"):
        evaluate("test_vit", dataset, out=out, progress=False, **dict(FAST, k=5))


def test_depth_protocol_beats_the_mean_depth_baseline(tmp_path, dataset):
    spec = dataset.replace("task=segmentation", "task=depth")
    report = evaluate("test_vit", spec, progress=False, **FAST)
    assert report.task == "depth" and 0 < report.metrics["rmse"] < 2.0
    # baseline: every query pixel predicted as the prompt's mean depth; RMSE per image
    # over valid (> 0) pixels, averaged over images, as the protocol reports it
    prompt = [s.label.numpy() for s in create_dataset(spec, split="train")]
    mean_depth = np.concatenate([d[d > 0] for d in prompt]).mean()
    queries = [s.label.numpy() for s in create_dataset(spec, split="val")]
    baseline = np.mean([np.sqrt(np.mean((d[d > 0] - mean_depth) ** 2)) for d in queries])
    assert report.metrics["rmse"] < 0.6 * baseline  # about 1.08 against 2.32
    assert {"abs_rel", "log10", "delta1", "delta2", "delta3"} <= set(report.metrics)


def test_eval_with_dense_fungi_features(dataset):
    report = evaluate(
        "test_vit",
        dataset,
        progress=False,
        **dict(FAST, layers=None, features="fungi", max_queries=4),
    )
    assert report.config["features"] == "fungi" and report.counts["queries"] == 4
    assert report.counts["memory_entries"] > 0 and report.metrics["miou"] > 0.5  # chance is ~0.25


def test_layers_read_correctly_in_reports():
    from hbird.eval.report import layers_text

    assert [layers_text(x) for x in (None, 0, -1, (8, 9))] == ["last", "0", "-1", "8,9"]
