"""The generic folder format: layouts, splits, inference of task and classes, and its errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data import FolderDataset, create_dataset
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.errors import InputError
from hbird.metrics import ConfusionMatrix

H, W = 16, 24


def _image(path: Path, seed: int = 0, size: tuple[int, int] = (H, W)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)


def _mask(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _labels(seed: int, num_classes: int = 3) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, num_classes, (H, W)).astype(np.uint8)
    arr[0, 0] = 255
    return arr


def make_folder(
    root: Path, stems=("a", "b", "c"), classes=("sky", "road", "car")
) -> dict[str, np.ndarray]:
    masks = {}
    for i, stem in enumerate(stems):
        _image(root / "images" / f"{stem}.png", i)
        masks[stem] = _labels(i, len(classes) if classes else 3)
        _mask(root / "masks" / f"{stem}.png", masks[stem])
    if classes:
        (root / "classes.txt").write_text("\n".join(classes) + "\n\n")
    return masks


def test_segmentation_folder_round_trip(tmp_path):
    masks = make_folder(tmp_path)
    ds = FolderDataset(tmp_path)
    assert ds.names == ["a", "b", "c"]
    spec = ds.label_spec
    assert (spec.task, spec.num_classes, spec.ignore_index) == ("segmentation", 3, 255)
    assert spec.class_names == ("sky", "road", "car")
    s = ds[1]
    assert s.name == "b" and s.image.shape == (3, H, W) and s.label.dtype == torch.int64
    assert torch.equal(s.label, torch.from_numpy(masks["b"].astype(np.int64)))
    assert s.label_path == tmp_path / "masks" / "b.png"
    assert ds[-1].name == "c"
    with pytest.raises(IndexError):
        ds[3]
    cm = ConfusionMatrix(3)
    for sample in ds:
        cm.update(torch.where(sample.label == 255, 0, sample.label), sample.label)
    assert cm.compute().miou == 1.0
    sub = ds.subset([2, 0])
    assert isinstance(sub, FolderDataset) and sub.names == ["c", "a"] and len(ds) == 3
    assert "3 images" in repr(ds)


def test_npy_masks_and_num_classes_argument(tmp_path):
    _image(tmp_path / "images" / "x.jpg")
    arr = _labels(0, 5).astype(np.int64)
    (tmp_path / "masks").mkdir()
    np.save(tmp_path / "masks" / "x.npy", arr)
    ds = create_dataset(f"folder:root={tmp_path}:num_classes=5")
    assert ds.label_spec.num_classes == 5 and ds.label_spec.class_names is None
    assert torch.equal(ds[0].label, torch.from_numpy(arr))


def test_depth_folder_png_mm_and_npy_metres(tmp_path):
    _image(tmp_path / "images" / "p.png", 0)
    _image(tmp_path / "images" / "q.png", 1)
    (tmp_path / "depth").mkdir()
    mm = np.full((H, W), 2500, np.uint16)
    mm[0] = 0
    Image.fromarray(mm).save(tmp_path / "depth" / "p.png")
    metres = np.full((H, W), 1.25, np.float32)
    metres[1, 1] = np.nan
    np.save(tmp_path / "depth" / "q.npy", metres)
    ds = create_dataset(f"folder:root={tmp_path}:max_depth=80")
    assert ds.label_spec.task == "depth" and ds.label_spec.max_value == 80.0
    p, q = ds[0].label, ds[1].label
    assert p.dtype == torch.float32 and p[1, 0] == 2.5 and (p[0] == 0).all()
    assert q[0, 0] == 1.25 and torch.isnan(q[1, 1])


def test_splits_as_folders_and_as_lists(tmp_path):
    for split, stems in (("train", ("t1", "t2")), ("val", ("v1",))):
        make_folder(tmp_path / "by_folder" / split, stems, classes=None)
    (tmp_path / "by_folder" / "classes.txt").write_text("a\nb\nc\n")  # shared, at the root
    ds = create_dataset(f"folder:root={tmp_path / 'by_folder'}:split=train")
    assert ds.names == ["t1", "t2"] and ds.label_spec.num_classes == 3
    with pytest.raises(InputError, match=r"split folders \['train', 'val'\]; pass split="):
        FolderDataset(tmp_path / "by_folder")

    root = tmp_path / "by_list"
    make_folder(root, ("a", "b", "c"))
    (root / "splits").mkdir()
    (root / "splits" / "val.txt").write_text("c\na\n")
    assert FolderDataset(root, split="val").names == ["c", "a"]
    assert FolderDataset(root).names == ["a", "b", "c"]
    with pytest.raises(InputError, match=r"no split 'test'.*split lists \['val'\]"):
        FolderDataset(root, split="test")
    (root / "splits" / "val.txt").write_text("a\nzz\n")
    with pytest.raises(InputError, match=r"lists 1 images not in .*\['zz'\]"):
        FolderDataset(root, split="val")


def test_task_inference(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "depth").mkdir()
    with pytest.raises(InputError, match="both masks/ and depth/; pass task="):
        FolderDataset(tmp_path)
    assert FolderDataset(tmp_path, task="segmentation").label_spec.task == "segmentation"
    with pytest.raises(InputError, match="task must be one of"):
        FolderDataset(tmp_path, task="normals")


def test_error_image_without_mask(tmp_path):
    make_folder(tmp_path)
    _image(tmp_path / "images" / "lonely.jpg")
    with pytest.raises(InputError) as err:
        FolderDataset(tmp_path)
    msg = str(err.value)
    assert "lonely.jpg has no mask" in msg and str(tmp_path / "masks" / "lonely.png") in msg
    assert "add the mask or remove the image" in msg


def test_error_mask_size_differs(tmp_path):
    make_folder(tmp_path)
    _mask(tmp_path / "masks" / "b.png", np.zeros((H, W + 2)))
    ds = FolderDataset(tmp_path)
    with pytest.raises(
        InputError, match=rf"b.png is {H}x{W + 2} \(HxW\) but image .*b.png is {H}x{W}"
    ):
        ds[1]


def test_error_label_value_out_of_range(tmp_path):
    make_folder(tmp_path)
    bad = _labels(1)
    bad[2, 2], bad[3, 3] = 7, 4
    _mask(tmp_path / "masks" / "b.png", bad)
    ds = FolderDataset(tmp_path)
    with pytest.raises(InputError, match=r"b.png holds values \[4, 7\].*3 classes.*classes.txt"):
        ds[1]
    assert ds[0].label.max() == 255  # the other files are fine


def test_error_missing_folders_and_classes(tmp_path):
    with pytest.raises(InputError, match="is not a folder"):
        FolderDataset(tmp_path / "nope")
    with pytest.raises(InputError, match="has no images/ folder"):
        FolderDataset(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(InputError, match="holds no images"):
        FolderDataset(tmp_path)
    _image(tmp_path / "images" / "a.png")
    (tmp_path / "masks").rmdir()
    with pytest.raises(InputError, match="no masks/ or depth/ folder"):
        FolderDataset(tmp_path)
    _mask(tmp_path / "masks" / "a.png", _labels(0))
    with pytest.raises(InputError, match="add .*classes.txt .*or pass num_classes="):
        FolderDataset(tmp_path)
    (tmp_path / "classes.txt").write_text("x\ny\nz\n")
    with pytest.raises(InputError, match="num_classes=4 disagrees"):
        FolderDataset(tmp_path, num_classes=4)


def test_duplicate_stems_are_refused(tmp_path):
    make_folder(tmp_path)
    _image(tmp_path / "images" / "a.jpg")
    with pytest.raises(InputError, match="share the stem 'a'"):
        FolderDataset(tmp_path)


def test_reads_what_synthetic_scenes_write(tmp_path):
    scenes = make_scenes(2, seed=0, num_classes=3)
    write_scene_folder(tmp_path, scenes)
    seg = FolderDataset(tmp_path, task="segmentation")
    depth = FolderDataset(tmp_path, task="depth")
    assert seg.label_spec.num_classes == 3
    for i, scene in enumerate(scenes):
        assert torch.equal(seg[i].label, torch.as_tensor(scene.mask).long())
        assert torch.allclose(depth[i].label, torch.as_tensor(scene.depth).float(), atol=5e-4)
