"""Panoptic layouts: every decoder against hand-written ids (hbird.data.panoptic)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data import create_dataset
from hbird.data.folder import read_class_names, read_thing_classes
from hbird.data.panoptic import (
    coco_rgb_to_id,
    decode_cityscapes_ids,
    decode_class_instance,
    decode_coco_segments,
    decode_kitti_step,
)
from hbird.data.panoptic_synthetic import (
    make_panoptic_scenes,
    touching_pairs,
    write_panoptic_folder,
)
from hbird.errors import InputError


def t(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_folder_ids_split_into_class_and_instance_with_void() -> None:
    pan = decode_class_instance(t([[0, 1003], [2000, 65535]]))
    assert pan.semantic.tolist() == [[0, 1], [2, 255]]
    assert pan.instance.tolist() == [[0, 3], [0, 0]]


def test_cityscapes_instance_ids() -> None:
    """26001 = car (train id 13) instance 1; 26 = a car crowd; 24002 = person (11) #2;
    7 = road (0); 0 = unlabelled (void); 29 (caravan, no train id) is void."""
    pan = decode_cityscapes_ids(t([[26001, 26, 24002], [7, 0, 29001]]))
    assert pan.semantic.tolist() == [[13, 13, 11], [0, 255, 255]]
    assert pan.instance.tolist() == [[1, 0, 2], [0, 0, 0]]


def test_coco_ids_and_segments() -> None:
    rgb = np.array([[[1, 0, 0], [44, 1, 0]], [[0, 0, 1], [0, 0, 0]]])
    ids = coco_rgb_to_id(rgb)
    assert ids.tolist() == [[1, 300], [65536, 0]]
    segments = [
        {"id": 300, "category_id": 1, "iscrowd": 0},
        {"id": 65536, "category_id": 1, "iscrowd": 1},
        {"id": 1, "category_id": 200, "iscrowd": 0},
    ]
    pan = decode_coco_segments(ids, segments, {1: 0, 200: 1}, thing_classes=[0])
    assert pan.semantic.tolist() == [[1, 0], [0, 255]]  # id 0: void
    assert pan.instance.tolist() == [[0, 1], [0, 0]]  # the crowd keeps instance 0


def test_kitti_step_channels() -> None:
    rgb = np.array([[[13, 1, 2], [0, 0, 0]], [[255, 0, 7], [11, 0, 3]]])
    pan = decode_kitti_step(rgb)
    assert pan.semantic.tolist() == [[13, 0], [255, 11]]
    assert pan.instance.tolist() == [[258, 0], [0, 3]]


def test_panoptic_folder_round_trip(tmp_path: Path) -> None:
    scenes = make_panoptic_scenes(3, seed=1, size=(24, 32))
    for split in ("train", "val"):
        write_panoptic_folder(tmp_path / split, scenes, prefix=split)
    assert read_class_names(tmp_path / "val" / "classes.txt") == (
        "ground",
        "disc",
        "box",
        "triangle",
    )
    assert read_thing_classes(tmp_path / "val" / "classes.txt") == (1, 2, 3)
    ds = create_dataset(f"folder:root={tmp_path}:split=val")
    assert ds.thing_classes == (1, 2, 3) and ds.names == ["val_0000", "val_0001", "val_0002"]
    for scene, sample in zip(scenes, ds):
        assert torch.equal(sample.image, scene.image)
        assert torch.equal(sample.label, scene.semantic)
        assert torch.equal(sample.instance, scene.instance)


def test_panoptic_folder_needs_a_class_list(tmp_path: Path) -> None:
    write_panoptic_folder(tmp_path, make_panoptic_scenes(1, seed=0, size=(16, 16)))
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(InputError, match=r"classes.txt.*\[thing\]"):
        create_dataset(f"folder:root={tmp_path}")


def test_thing_tags_are_not_part_of_semantic_class_names(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "masks" / "a.png")
    (tmp_path / "classes.txt").write_text("road [stuff]\nchest of drawers [thing]\n")
    ds = create_dataset(f"folder:root={tmp_path}")
    assert ds.label_spec.class_names == ("road", "chest of drawers")
    assert not hasattr(ds, "thing_classes")  # masks/ decide: a semantic dataset


def test_coco_layout_reads_crowds(tmp_path: Path) -> None:
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (5, 0, 0)
    rgb[2:, :2] = (6, 0, 0)
    (tmp_path / "val2017").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "val2017" / "1.jpg")
    (tmp_path / "annotations" / "panoptic_val2017").mkdir(parents=True)
    Image.fromarray(rgb).save(tmp_path / "annotations" / "panoptic_val2017" / "1.png")
    cats = [{"id": 3, "name": "car", "isthing": 1}, {"id": 9, "name": "road", "isthing": 0}]
    segs = [{"id": 5, "category_id": 9}, {"id": 6, "category_id": 3, "iscrowd": 1}]
    (tmp_path / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps(
            {"categories": cats, "annotations": [{"file_name": "1.png", "segments_info": segs}]}
        )
    )
    ds = create_dataset(f"coco_panoptic:root={tmp_path}:split=val")
    assert ds.thing_classes == (0,) and ds.label_spec.class_names == ("car", "road")
    sample = ds[0]
    assert sample.label.tolist() == [[1] * 4, [1] * 4, [0, 0, 255, 255], [0, 0, 255, 255]]
    assert int(sample.instance.max()) == 0  # a crowd has no instance id


def test_touching_pairs_counts_same_class_neighbours_only() -> None:
    semantic = t([[1, 1, 2], [1, 1, 2]])
    instance = t([[1, 2, 1], [1, 2, 1]])  # 1/1 touches 1/2; 1/2 touches 2/1 (other class)
    assert touching_pairs(semantic, instance) == 1


def test_synthetic_panoptic_scenes() -> None:
    """Deterministic, independent of n, same-class instances touching in most scenes,
    instances numbered 1.. within their class."""
    a = make_panoptic_scenes(8, seed=4)
    b = make_panoptic_scenes(3, seed=4)
    assert all(torch.equal(x.instance, y.instance) for x, y in zip(a, b))
    assert sum(touching_pairs(s.semantic, s.instance) > 0 for s in a) >= 3
    for s in a:
        assert bool(((s.semantic == 0) == (s.instance == 0)).all())  # ground: stuff
        for c in torch.unique(s.semantic[s.semantic > 0]).tolist():
            ids = torch.unique(s.instance[s.semantic == c]).tolist()
            assert ids == list(range(1, len(ids) + 1))
    ds = create_dataset("synthetic_panoptic:n=3:seed=4")
    assert torch.equal(ds[2].instance, a[2].instance) and ds.thing_classes == (1, 2, 3)
