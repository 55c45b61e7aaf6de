"""``hbird eval --protocol max-deeplab`` end to end on the folder panoptic layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hbird.cli import main
from hbird.data.panoptic_synthetic import make_panoptic_scenes, write_panoptic_folder

pytest.importorskip("scipy")

TRAIN = ["--train", "steps=2", "--train", "batch_size=2", "--train", "crop_size=32"]


@pytest.mark.slow  # about 30 s on a loaded 2-core machine
def test_max_deeplab_protocol_trains_scores_and_draws(tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    write_panoptic_folder(root / "train", make_panoptic_scenes(4, seed=0, size=(32, 32)), "t")
    write_panoptic_folder(
        root / "val", make_panoptic_scenes(2, seed=0, split="val", size=(32, 32)), "v"
    )

    def run(out: Path, *extra: str) -> int:
        argv = ["eval", "--protocol", "max-deeplab", "--quiet", "--dataset", f"folder:root={root}"]
        return main([*argv, "--out", str(out), "overlays=2", "--train", "num_workers=0", *extra])

    out = tmp_path / "run"
    assert run(out, *TRAIN, "--specialist-option", "preset=tiny") == 0
    report = json.loads((out / "metrics.json").read_text())
    assert report["task"] == "panoptic" and report["config"]["specialist"] == "max-deeplab"
    assert {"pq", "pq_th", "pq_st", "sq", "rq"} <= set(report["metrics"])
    assert report["counts"] == {"prompt_images": 4, "queries": 2}
    assert len(list((out / "pictures").glob("*.png"))) == 2
    assert (out / "specialist" / "specialist.safetensors").is_file()
    # a builder option max-deeplab does not have is one line naming the ones it has
    assert run(tmp_path / "bad", *TRAIN, "--specialist-option", "x=1") != 0
    assert "max-deeplab does not take x" in capsys.readouterr().err
