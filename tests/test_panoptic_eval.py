"""``hbird eval --protocol panoptic-retrieval`` end to end on the folder panoptic layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hbird.cli import main
from hbird.data import create_dataset
from hbird.data.panoptic_synthetic import make_panoptic_scenes, write_panoptic_folder
from hbird.data.synthetic import make_scenes, write_scene_folder

pytest.importorskip("scipy")

ARGS = "eval --encoder test_vit --preset quick --quiet --protocol panoptic-retrieval"


@pytest.fixture(scope="module")
def panoptic_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("panoptic")
    write_panoptic_folder(root / "train", make_panoptic_scenes(4, seed=0, size=(32, 32)), "t")
    val = make_panoptic_scenes(3, seed=0, split="val", size=(32, 32))
    write_panoptic_folder(root / "val", val, "v")
    return root


def run(root: Path, out: Path, *extra: str) -> int:
    argv = [*ARGS.split(), "--dataset", f"folder:root={root}", "--out", str(out)]
    return main([*argv, "image_size=64", "overlays=2", *extra])


def gt_segments(root: Path) -> dict[str, int]:
    """Ground-truth segments per class name, counted from the files (every one is a TP
    or a FN: these scenes have no void and no crowd)."""
    queries = create_dataset(f"folder:root={root}:split=val")
    names = queries.label_spec.class_names
    counts = dict.fromkeys(names, 0)
    for sample in queries:
        for c in torch.unique(sample.label).tolist():
            ids = torch.unique(sample.instance[sample.label == c])
            counts[names[c]] += 1 if c not in queries.thing_classes else len(ids)
    return counts


@pytest.mark.parametrize("grouping", ["offsets", "components"])
def test_panoptic_eval_writes_pq_per_class_and_pictures(
    panoptic_folder: Path, tmp_path: Path, grouping: str, capsys
) -> None:
    out = tmp_path / "run"
    assert run(panoptic_folder, out, "--grouping", grouping) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == "panoptic" and report["config"]["grouping"] == grouping
    assert {"pq", "pq_th", "pq_st", "sq", "rq"} <= set(report["metrics"])
    rows = {r["class"]: r for r in report["per_class"]}
    assert {n: r["tp"] + r["fn"] for n, r in rows.items()} == gt_segments(panoptic_folder)
    assert rows["ground"]["kind"] == "stuff" and rows["disc"]["kind"] == "thing"
    assert 0.0 <= report["metrics"]["pq"] <= 1.0
    summary = (out / "summary.md").read_text()
    assert "| pq |" in summary and "| class | kind | PQ | SQ | RQ | TP | FP | FN |" in summary
    assert f"grouping {grouping}" in summary
    pictures = sorted((out / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["v_0000.png", "v_0001.png"]
    assert Image.open(pictures[0]).width > 3 * 32  # image | ground truth | prediction
    assert (out / "bank_offsets").is_dir() == (grouping == "offsets")
    assert "| pq |" in capsys.readouterr().out
    # run again: resumes from the finished run folder, same numbers
    assert run(panoptic_folder, out, "--grouping", grouping) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"] == report["metrics"]
    # another grouping is another run: refused in this folder
    other = "components" if grouping == "offsets" else "offsets"
    assert run(panoptic_folder, out, "--grouping", other) != 0


def test_panoptic_eval_refuses_a_semantic_dataset(tmp_path: Path, capsys) -> None:
    for split in ("train", "val"):
        write_scene_folder(
            tmp_path / split, make_scenes(1, seed=0, size=(16, 16)), with_depth=False
        )
    argv = [*ARGS.split(), "--dataset", f"folder:root={tmp_path}"]
    assert main(argv) != 0
    err = capsys.readouterr().err
    assert "no instance labels" in err and "synthetic_panoptic" in err


def test_panoptic_eval_over_prompt_fractions(panoptic_folder: Path, tmp_path: Path) -> None:
    """The data-efficiency sweep (Balazevic et al. 2023, §4.2) runs the panoptic protocol."""
    out = tmp_path / "sweep"
    assert run(panoptic_folder, out, "--fractions", "1/2,1/1", "--seeds", "42") == 0
    sweep = json.loads((out / "data_efficiency.json").read_text())
    assert sweep["metric"] == "pq" and [r["prompt_images"] for r in sweep["fractions"]] == [2, 4]
    run_report = json.loads((out / "fractions/1_2/seed_42/metrics.json").read_text())
    assert run_report["counts"]["prompt_images"] == 2 and run_report["task"] == "panoptic"
