"""``hbird zeroshot index|build|predict`` and ``hbird eval --protocol reco`` end to end on
a written toy-world folder (issue 11, Acceptance: under 30 s on 2 CPU cores), and the
errors people get (issue 11, "Bad input"). The end-to-end run is marked slow: about 10 s
alone, but far longer on a loaded machine."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from hbird.cli import main
from hbird.data.synthetic import write_scene_folder
from hbird.zeroshot import toy

CLASSES = ",".join(toy.CLASSES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zeroshot_cli")
    scenes = toy.make_scenes(40, seed=0)
    write_scene_folder(root / "unlabelled", scenes, toy.CLASSES, with_depth=False)
    tests = [toy.make_scene(1, i, objects=[1 + i % 4], sizes=(12, 20)) for i in range(4)]
    write_scene_folder(root / "bench" / "val", tests, toy.CLASSES, with_depth=False)
    return root


def _index(images, clip, out) -> int:
    return main(f"zeroshot index --images {images} --clip {clip} --out {out} --quiet".split())


@pytest.mark.slow
def test_index_build_predict_eval_end_to_end(folders, tmp_path, capsys):
    start = time.perf_counter()
    coll, refs, preds, run = (tmp_path / n for n in ("coll", "refs", "preds", "run"))
    assert _index(folders / "unlabelled" / "images", "toy_clip", coll) == 0
    build = (
        f"zeroshot build --collection {coll} --classes {CLASSES} --encoder test_vit "
        f"--dense-clip toy_clip --k 12 --image-size 48 --contexts gray --out {refs} --quiet"
    ).split()
    assert main([*build, "--rename", "grey=gray"]) == 2  # grey is not one of the classes
    assert "not in the list" in capsys.readouterr().err
    assert main(build) == 0
    query = folders / "bench" / "val" / "images"
    assert (
        main(f"zeroshot predict --refs {refs} --query {query} --out {preds} --quiet".split()) == 0
    )
    for file in sorted(query.iterdir()):
        mask = np.asarray(Image.open(preds / f"{file.stem}.png"))
        assert mask.shape == (48, 48) and mask.max() < len(toy.CLASSES)
        assert (preds / f"{file.stem}_overlay.png").is_file()
    assert (preds / "classes.txt").read_text().split() == list(toy.CLASSES)
    spec = f"folder:root={folders / 'bench'}"
    argv = f"eval --protocol reco --refs {refs} --dataset {spec} --out {run} --quiet".split()
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ReCo (test_vit)" in out and "no Hungarian matching" in out
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["metrics"]["miou"] <= 1 and 0 <= metrics["metrics"]["pixel_accuracy"] <= 1
    assert [row["class"] for row in metrics["per_class"]] == list(toy.CLASSES)
    assert len(list((run / "archives").glob("*.png"))) == len(toy.CLASSES)
    assert list((run / "pictures").glob("*.png"))
    assert main(argv) == 0  # resumed from the finished run: the same numbers
    assert json.loads((run / "metrics.json").read_text())["metrics"] == metrics["metrics"]
    assert time.perf_counter() - start < 30


def test_cli_errors(folders, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _index(tmp_path / "empty", "test_clip", tmp_path / "c0") == 2
    assert "collection is empty" in capsys.readouterr().err
    coll = tmp_path / "coll"
    assert _index(folders / "unlabelled" / "images", "test_clip", coll) == 0
    build = (
        f"zeroshot build --collection {coll} --classes road,sky --encoder test_vit "
        f"--image-size 32 --out {tmp_path / 'refs'} --quiet"
    ).split()
    assert main([*build, "--k", "41"]) == 2
    err = capsys.readouterr().err
    assert "k=41" in err and "holds only 40" in err and "Traceback" not in err
    from safetensors.torch import save_file

    from hbird.zeroshot.clip import create_clip

    other = tmp_path / "other_clip.safetensors"
    save_file(create_clip("test_clip", seed=1).state_dict(), str(other))
    assert main([*build, "--k", "5", "--clip-weights", str(other)]) == 2
    assert "built with CLIP test_clip" in capsys.readouterr().err
    assert main(["eval", "--protocol", "reco", "--dataset", "folder:root=x"]) == 2
    assert "--refs" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_clip_weights_offline_is_one_clear_line(folders, tmp_path, capsys, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    images = folders / "unlabelled" / "images"
    argv = (
        f"zeroshot index --images {images} --clip RN50 --clip-weights openai --out {tmp_path / 'c'}"
    )
    assert main([*argv.split(), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--clip-weights" in err and "offline" in err and "Traceback" not in err
