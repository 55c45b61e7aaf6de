"""``hbird eval --protocol panoptic-deeplab`` end to end on the folder panoptic layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from hbird.cli import main
from hbird.data.panoptic_synthetic import make_panoptic_scenes, write_panoptic_folder
from hbird.data.synthetic import make_scenes, write_scene_folder
from test_panoptic_eval import gt_segments

pytest.importorskip("scipy")
pytest.importorskip("timm")

TRAIN = ["--train", "steps=2", "--train", "batch_size=2", "--train", "crop_size=32"]
TINY = ["--specialist-option", "backbone=test_axial", "--specialist-option", "decoder_width=0.25"]


@pytest.fixture(scope="module")
def panoptic_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("panoptic")
    write_panoptic_folder(root / "train", make_panoptic_scenes(4, seed=0, size=(32, 32)), "t")
    write_panoptic_folder(
        root / "val", make_panoptic_scenes(3, seed=0, split="val", size=(32, 32)), "v"
    )
    return root


def run(root: Path, out: Path, *extra: str) -> int:
    argv = ["eval", "--protocol", "panoptic-deeplab", "--quiet", "--dataset", f"folder:root={root}"]
    return main([*argv, "--out", str(out), "overlays=2", "--train", "num_workers=0", *extra])


def test_the_protocol_trains_scores_pq_and_draws_instance_outlines(
    panoptic_folder: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "run"
    assert run(panoptic_folder, out, *TRAIN, *TINY) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == "panoptic" and report["config"]["specialist"] == "panoptic-deeplab"
    assert {"pq", "pq_th", "pq_st", "sq", "rq"} <= set(report["metrics"])
    rows = {r["class"]: r for r in report["per_class"]}
    assert {n: r["tp"] + r["fn"] for n, r in rows.items()} == gt_segments(panoptic_folder)
    assert report["counts"] == {"prompt_images": 4, "queries": 3}
    assert report["config"]["training"]["steps"] == 2
    summary = (out / "summary.md").read_text()
    assert "| class | kind | PQ | SQ | RQ | TP | FP | FN |" in summary
    assert "trained 2 steps" in summary and "test_axial" in summary
    pictures = sorted((out / "pictures").glob("*.png"))
    assert [p.name for p in pictures] == ["v_0000.png", "v_0001.png"]
    assert Image.open(pictures[0]).width > 3 * 32
    checkpoint = out / "specialist" / "specialist.safetensors"
    assert checkpoint.is_file() and "| pq |" in capsys.readouterr().out
    # run again: the finished training and scoring are reused, same numbers
    assert run(panoptic_folder, out, *TRAIN, *TINY) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"] == report["metrics"]
    # other training settings are another run: refused in this folder
    assert run(panoptic_folder, out, *TRAIN, *TINY, "--train", "lr=0.01") != 0
    assert "other settings" in capsys.readouterr().err
    # the saved specialist, loaded instead of trained, scores the same
    loaded = tmp_path / "loaded"
    assert run(panoptic_folder, loaded, "--specialist-checkpoint", str(checkpoint)) == 0
    again = json.loads((loaded / "metrics.json").read_text())
    assert again["metrics"] == report["metrics"] and not (loaded / "specialist").exists()
    assert "loaded from" in (loaded / "summary.md").read_text()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train", "stepz=3"], "--train does not take stepz"),
        (["--train", "crop_size=40"], "multiple of"),
        (["--specialist-option", "backbone=nope"], "nope"),
        (["--specialist-option", "foo=1"], "has no option foo"),
        (["--encoder", "test_axial"], "--specialist-option backbone=NAME"),
        (["--specialist-checkpoint", "missing.safetensors"], "no specialist checkpoint"),
        (["--fractions", "1/2"], "--fractions"),
        (["--lr", "0.005", "--train", "lr=0.01"], "--lr 0.005 and --train lr=0.01 disagree"),
        (["--epochs", "0"], "epochs must be >= 1"),
    ],
)
def test_bad_flags_are_one_line_errors(
    panoptic_folder: Path, tmp_path: Path, capsys, extra: list[str], message: str
) -> None:
    train = TRAIN[:4] if "crop_size=40" in extra else TRAIN
    assert run(panoptic_folder, tmp_path / "run", *train, *TINY, *extra) != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_epochs_and_lr_flags_reach_the_training(panoptic_folder: Path, tmp_path: Path) -> None:
    """``--epochs 1`` on the 4 train images in batches of 2 is 2 steps (not --train's
    steps=2000 default example nor SpecialistConfig's 1000); ``--lr 0.005`` is the base
    rate: without warm-up (5 % of 2 steps rounds to 0) the second step's rate is DeepLab's
    poly 0.005 · (1 - 1/2)^0.9."""
    out = tmp_path / "run"
    argv = ["--epochs", "1", "--lr", "0.005", "--train", "batch_size=2", "--train", "crop_size=32"]
    assert run(panoptic_folder, out, *argv, *TINY) == 0
    records = [
        json.loads(x) for x in (out / "specialist" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [2]
    assert records[0]["lr"] == pytest.approx(0.005 * 0.5**0.9)
    training = json.loads((out / "metrics.json").read_text())["config"]["training"]
    assert training["epochs"] == 1 and training["lr"] == 0.005
    assert "trained 1 epoch on the prompt split" in (out / "summary.md").read_text()


def test_a_semantic_dataset_is_refused(tmp_path: Path, capsys) -> None:
    for split in ("train", "val"):
        write_scene_folder(
            tmp_path / "sem" / split, make_scenes(2, seed=0, size=(32, 32)), with_depth=False
        )
    assert run(tmp_path / "sem", tmp_path / "run", *TRAIN, *TINY) != 0
    err = capsys.readouterr().err
    assert "no instance labels" in err and "Traceback" not in err
