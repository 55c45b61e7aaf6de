"""Spec strings, the dataset registry, and the generic subset/fraction keys."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data import DATASETS, create_dataset, parse_spec, write_subset
from hbird.errors import HbirdError, InputError
from hbird.io.options import parse_value


def test_parse_spec_values_and_paths():
    assert parse_spec("voc:root=/data/VOC2012:split=val") == (
        "voc",
        {"root": "/data/VOC2012", "split": "val"},
    )
    name, kw = parse_spec(
        "cocostuff:root=/d:classes=27:max_depth=10.5:fraction=1/128:x=1e-3:flag=true"
    )
    assert name == "cocostuff"
    assert kw == {
        "root": "/d",
        "classes": 27,
        "max_depth": 10.5,
        "fraction": "1/128",
        "x": 0.001,
        "flag": True,
    }
    assert isinstance(kw["classes"], int)
    # a field without '=' continues the previous value, so drive letters survive
    assert parse_spec("folder:root=C:\\data\\x:split=val")[1] == {
        "root": "C:\\data\\x",
        "split": "val",
    }
    assert parse_spec("folder") == ("folder", {})


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("-3", -3),
        ("007", "007"),
        ("2.5", 2.5),
        (".5", 0.5),
        ("1e-3", 0.001),
        ("False", False),
        ("val", "val"),
        ("/a/b", "/a/b"),
    ],
)
def test_parse_value(text, value):
    assert parse_value(text) == value and type(parse_value(text)) is type(value)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (":root=/x", "must start with a dataset name"),
        ("root=/x", "must start"),
        ("voc:split", "is not key=value"),
        ("voc:root=/a:root=/b", "twice"),
        ("voc:9x=1", "not a valid argument name"),
    ],
)
def test_parse_spec_errors(spec, match):
    with pytest.raises(InputError, match=match):
        parse_spec(spec)


def test_registry_lists_the_builtin_datasets():
    builtin = (
        "ade20k cityscapes cityscapes_panoptic coco_panoptic cocostuff folder imagefolder "
        "kitti_step kitti_step_panoptic nyuv2 synthetic synthetic_panoptic voc"
    ).split()
    assert DATASETS.names() == builtin
    with pytest.raises(KeyError, match="unknown dataset 'kitti'.*registered: ade20k"):
        create_dataset("kitti:root=/x")
    try:  # the CLI prints HbirdErrors as one line, so the message must read well unquoted
        create_dataset("nosuch:root=x")
    except HbirdError as err:
        assert str(err).startswith("unknown dataset 'nosuch'; registered: ade20k, cityscapes")
    else:
        raise AssertionError("an unknown dataset name must raise")


def test_seed_goes_to_a_dataset_that_takes_one():
    a = create_dataset("synthetic:n=3:seed=1:size=16")
    b = create_dataset("synthetic:n=3:seed=2:size=16")
    assert not torch.equal(a[0].image, b[0].image)  # seed= drew other scenes
    full = create_dataset("synthetic:n=8:seed=1:size=16")
    picked = create_dataset("synthetic:n=8:seed=1:size=16:fraction=0.5")  # and seeds the subset
    assert len(picked) == 4 and len(set(picked.names)) == 4
    by_name = dict(zip(full.names, range(len(full))))
    for i, name in enumerate(picked.names):
        assert torch.equal(picked[i].image, full[by_name[name]].image)


@pytest.fixture
def folder(tmp_path) -> Path:
    for i in range(8):
        rgb = np.full((16, 24, 3), i * 20, np.uint8)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "masks").mkdir(exist_ok=True)
        Image.fromarray(rgb).save(tmp_path / "images" / f"img{i}.png")
        Image.fromarray(np.full((16, 24), i % 2, np.uint8)).save(tmp_path / "masks" / f"img{i}.png")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    return tmp_path


def test_create_dataset_overrides_and_name_keyword(folder):
    ds = create_dataset(f"folder:root={folder}:ignore_index=0", ignore_index=255)
    assert ds.label_spec.ignore_index == 255
    ds2 = create_dataset(name="folder", root=folder)
    assert ds2.names == ds.names and len(ds2) == 8
    with pytest.raises(InputError, match="give a dataset spec"):
        create_dataset()


def test_create_dataset_argument_errors(folder):
    with pytest.raises(
        InputError, match=r"'folder' does not take colour; it takes root, split, task"
    ):
        create_dataset(f"folder:root={folder}:colour=red")
    with pytest.raises(InputError, match=r"'voc' needs root="):
        create_dataset("voc:split=val")
    with pytest.raises(InputError, match="seed= only applies together with fraction="):
        create_dataset(f"folder:root={folder}:seed=1")


def test_subset_file_and_fraction_keys(folder, tmp_path):
    listed = write_subset(tmp_path / "subsets" / "few.txt", ["img5", "img2"])
    ds = create_dataset(f"folder:root={folder}:subset={listed}")
    assert ds.names == ["img5", "img2"]
    few = create_dataset(f"folder:root={folder}:fraction=1/4:seed=3")
    assert len(few) == 2
    assert few.names == create_dataset(f"folder:root={folder}", fraction="1/4", seed=3).names
    assert create_dataset(f"folder:root={folder}:fraction=0.01").names != []  # at least one image
    write_subset(listed, ["img5", "missing"])
    with pytest.raises(InputError, match=r"not in the dataset, e.g. \['missing'\]"):
        create_dataset(f"folder:root={folder}:subset={listed}")
