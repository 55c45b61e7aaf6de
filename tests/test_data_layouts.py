"""Benchmark layouts built as tiny fixtures: label conventions, spec strings, raw-to-class tables."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data import create_dataset
from hbird.data.datasets import CITYSCAPES_ID_TO_TRAINID, cocostuff_label_map
from hbird.errors import InputError
from hbird.metrics import ConfusionMatrix, DepthMetrics

H, W = 16, 24


def _rgb(path: Path, seed: int) -> np.ndarray:
    arr = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _mask(path: Path, values: list[int], mode: str = "L", seed: int = 0) -> np.ndarray:
    """A (H, W) uint8 mask tiling ``values`` in random blocks; saved as grey or palette PNG."""
    rng = np.random.default_rng(seed)
    arr = np.asarray(values, dtype=np.uint8)[rng.integers(0, len(values), (H, W))]
    arr.flat[: len(values)] = values  # every value present at least once
    if mode == "P":
        img = Image.frombytes("P", (W, H), arr.tobytes())
        img.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        img = Image.fromarray(arr)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return arr


IGNORE = 255
IDENTITY = {v: v for v in range(256)}


def _labels_follow_tables(ds, tables: list[dict[int, int]]) -> None:
    """Sample ``i``'s label is ``tables[i][raw value]`` of its label file, pixel by pixel
    (the tables are written out in the tests), and a confusion matrix built with the
    dataset's label spec counts exactly the pixels the tables do not map to 255."""
    spec = ds.label_spec
    cm = ConfusionMatrix(spec.num_classes, spec.ignore_index)
    kept = 0
    for sample, table in zip(ds, tables, strict=True):
        raw = np.asarray(Image.open(sample.label_path))
        want = torch.from_numpy(np.vectorize(table.__getitem__, otypes=[np.int64])(raw))
        assert torch.equal(sample.label, want), sample.name
        cm.update(torch.where(want == IGNORE, 0, want), sample.label)
        kept += int((want != IGNORE).sum())
    assert int(cm.matrix.sum()) == kept > 0 and cm.compute().miou == 1.0


# ------------------------------------------------------------------ VOC


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "val.txt").write_text("2007_000001\n2007_000002\n")
    # DeepLab-style trainaug list: "image mask" paths per line
    (lists / "trainaug.txt").write_text(
        "/JPEGImages/2008_000003.jpg /SegmentationClassAug/2008_000003.png\n"
    )
    for i, stem in enumerate(["2007_000001", "2007_000002", "2008_000003"]):
        _rgb(root / "JPEGImages" / f"{stem}.jpg", i)
    _mask(root / "SegmentationClass" / "2007_000001.png", [0, 15, 255], "P", 1)
    _mask(root / "SegmentationClass" / "2007_000002.png", [0, 20], "P", 2)
    _mask(root / "SegmentationClassAug" / "2008_000003.png", [0, 3], "L", 3)
    return root


def test_voc_keeps_ids_and_255_as_ignore(voc_root):
    ds = create_dataset(f"voc:root={voc_root}:split=val")
    assert len(ds) == 2 and ds.names == ["2007_000001", "2007_000002"]
    assert ds.label_spec.num_classes == 21 and ds.label_spec.ignore_index == 255
    assert ds.label_spec.class_names[15] == "person"
    s = ds[0]
    png = Image.open(voc_root / "SegmentationClass" / "2007_000001.png")
    assert png.mode == "P"
    raw = np.asarray(png)
    assert s.label.dtype == torch.int64 and torch.equal(
        s.label, torch.from_numpy(raw.astype(np.int64))
    )
    assert set(s.label.unique().tolist()) == {0, 15, 255}
    assert s.image.shape == (3, H, W) and s.image.dtype == torch.float32
    assert 0 <= s.image.min() and s.image.max() <= 1
    assert s.image_path == voc_root / "JPEGImages" / "2007_000001.jpg"
    _labels_follow_tables(ds, [IDENTITY, IDENTITY])  # VOC stores class ids and 255


def test_voc_trainaug_reads_segmentation_class_aug(voc_root):
    ds = create_dataset(f"voc:root={voc_root}:split=trainaug")
    assert ds.names == ["2008_000003"]
    assert ds[0].label_path.parent.name == "SegmentationClassAug"
    assert set(ds[0].label.unique().tolist()) == {0, 3}


def test_voc_errors_name_the_problem(voc_root):
    with pytest.raises(InputError, match=r"available: \['trainaug', 'val'\]"):
        create_dataset(f"voc:root={voc_root}:split=train")
    _mask(voc_root / "SegmentationClass" / "2007_000002.png", [0, 30], "P", 2)
    ds = create_dataset(f"voc:root={voc_root}")
    with pytest.raises(InputError, match=r"2007_000002.png holds raw values \[30\].*PASCAL VOC"):
        ds[1]
    (voc_root / "SegmentationClass" / "2007_000002.png").unlink()
    with pytest.raises(InputError, match="missing files: .*2007_000002.png"):
        create_dataset(f"voc:root={voc_root}")


# ------------------------------------------------------------------ ADE20K


def test_ade20k_zero_becomes_ignore_and_ids_shift_down(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for i, stem in enumerate(["ADE_val_00000001", "ADE_val_00000002"]):
        _rgb(root / "images" / "validation" / f"{stem}.jpg", i)
        _mask(root / "annotations" / "validation" / f"{stem}.png", [0, 1, 2, 150], "L", i)
    ds = create_dataset(f"ade20k:root={root}:split=val")
    assert len(ds) == 2 and ds.label_spec.num_classes == 150
    raw = torch.from_numpy(
        np.asarray(Image.open(root / "annotations" / "validation" / "ADE_val_00000001.png")).astype(
            np.int64
        )
    )
    label = ds[0].label
    assert torch.equal(label[raw == 0], torch.full_like(label[raw == 0], 255))
    assert torch.equal(label[raw > 0], raw[raw > 0] - 1)
    assert set(label.unique().tolist()) == {0, 1, 149, 255}
    assert ds.label_spec.class_names[0] == "wall" and ds.label_spec.class_names[149] == "flag"
    shift = {0: IGNORE, **{v: v - 1 for v in range(1, 151)}}
    _labels_follow_tables(ds, [shift, shift])
    _mask(root / "annotations" / "validation" / "ADE_val_00000002.png", [0, 151], "L", 1)
    with pytest.raises(InputError, match=r"raw values \[151\].*ADE20K"):
        ds[1]


# ------------------------------------------------------------------ Cityscapes


def test_cityscapes_train_ids_and_label_id_mapping(tmp_path):
    root = tmp_path / "cityscapes"
    img = root / "leftImg8bit" / "val"
    gt = root / "gtFine" / "val"
    _rgb(img / "frankfurt" / "frankfurt_000000_000294_leftImg8bit.png", 0)
    _mask(
        gt / "frankfurt" / "frankfurt_000000_000294_gtFine_labelTrainIds.png",
        [0, 13, 18, 255],
        "L",
        0,
    )
    _rgb(img / "lindau" / "lindau_000000_000019_leftImg8bit.png", 1)
    raw = _mask(
        gt / "lindau" / "lindau_000000_000019_gtFine_labelIds.png", [0, 7, 9, 26, 33], "L", 1
    )
    ds = create_dataset(f"cityscapes:root={root}:split=val")
    assert ds.names == ["frankfurt_000000_000294", "lindau_000000_000019"]
    assert set(ds[0].label.unique().tolist()) == {0, 13, 18, 255}
    mapped = ds[1].label
    expected = {
        0: 255,
        7: 0,
        9: 255,
        26: 13,
        33: 18,
    }  # unlabeled, road, parking (void), car, bicycle
    for raw_id, train_id in expected.items():
        assert (mapped[torch.from_numpy(raw) == raw_id] == train_id).all()
    assert sorted(CITYSCAPES_ID_TO_TRAINID.values()) == list(range(19))
    assert ds.label_spec.class_names[13] == "car"
    _labels_follow_tables(ds, [IDENTITY, expected])  # labelTrainIds as they are; labelIds mapped


# ------------------------------------------------------------------ COCO-Stuff


@pytest.fixture
def coco_root(tmp_path):
    root = tmp_path / "cocostuff"
    _rgb(root / "images" / "val2017" / "000000000139.jpg", 0)
    _mask(
        root / "stuffthingmaps" / "val2017" / "000000000139.png", [0, 12, 91, 156, 181, 255], "L", 0
    )
    return root


def test_cocostuff_171_mapping(coco_root):
    ds = create_dataset(f"cocostuff:root={coco_root}:split=val:classes=171")
    assert ds.label_spec.num_classes == 171
    raw = torch.from_numpy(
        np.asarray(
            Image.open(coco_root / "stuffthingmaps" / "val2017" / "000000000139.png")
        ).astype(np.int64)
    )
    label = ds[0].label
    # person 0 -> 0; stop sign 12 -> 11 (street sign 11 unused); banner 91 -> 80;
    # sky-other 156 -> 145; wood 181 -> 170; unlabelled 255 stays 255
    table = {0: 0, 12: 11, 91: 80, 156: 145, 181: 170, 255: 255}
    for raw_id, new_id in table.items():
        assert (label[raw == raw_id] == new_id).all()
    names = ds.label_spec.class_names
    assert (names[0], names[11], names[80], names[145], names[170]) == (
        "person",
        "stop sign",
        "banner",
        "sky-other",
        "wood",
    )
    _labels_follow_tables(ds, [table])


def test_cocostuff_27_mapping(coco_root):
    ds = create_dataset(f"cocostuff:root={coco_root}:split=val2017:classes=27")
    raw = torch.from_numpy(
        np.asarray(
            Image.open(coco_root / "stuffthingmaps" / "val2017" / "000000000139.png")
        ).astype(np.int64)
    )
    label = ds[0].label
    names = ds.label_spec.class_names
    # person -> person (9), stop sign -> outdoor (8), banner -> textile (17),
    # sky-other -> sky (23), wood -> solid (24)
    for raw_id, coarse in {
        0: "person",
        12: "outdoor",
        91: "textile",
        156: "sky",
        181: "solid",
    }.items():
        assert (label[raw == raw_id] == names.index(coarse)).all()
    assert names.index("person") == 9 and names.index("sky") == 23 and len(names) == 27
    assert (label[raw == 255] == 255).all()
    _labels_follow_tables(ds, [{0: 9, 12: 8, 91: 17, 156: 23, 181: 24, 255: IGNORE}])


def test_cocostuff_tables_are_consistent():
    lut171, names171 = cocostuff_label_map(171)
    assert len(set(names171)) == 171
    assert sorted(lut171[lut171 >= 0].tolist()) == [*range(171), 255]
    assert (lut171[:182] == -1).sum() == 11  # the unused COCO thing ids
    lut27, _ = cocostuff_label_map(27)
    assert set(lut27[:182].tolist()) == set(range(27))
    with pytest.raises(InputError, match="171 or classes=27"):
        cocostuff_label_map(182)


def test_cocostuff_unused_id_is_an_error(coco_root):
    _mask(coco_root / "stuffthingmaps" / "val2017" / "000000000139.png", [0, 11], "L", 0)
    ds = create_dataset(f"cocostuff:root={coco_root}")
    with pytest.raises(InputError, match=r"raw values \[11\]"):
        ds[0]


# ------------------------------------------------------------------ NYUv2


def _nyu_depth(seed: int) -> np.ndarray:
    d = np.random.default_rng(seed).uniform(0.5, 9.5, (H, W)).astype(np.float32)
    d[0, :3] = 0.0  # invalid
    return d


def test_nyuv2_folder_layout_16bit_mm(tmp_path):
    root = tmp_path / "nyu"
    for split in ("train", "test"):
        _rgb(root / split / "images" / "00001.jpg", 0)
        mm = np.round(_nyu_depth(1) * 1000).astype(np.uint16)
        (root / split / "depth").mkdir(parents=True)
        Image.fromarray(mm).save(root / split / "depth" / "00001.png")
    ds = create_dataset(f"nyuv2:root={root}:split=test")
    assert ds.label_spec.task == "depth" and ds.label_spec.max_value == 10.0
    s = ds[0]
    assert s.label.dtype == torch.float32 and s.label.shape == (H, W)
    expected = torch.from_numpy(mm.astype(np.float32) / 1000)
    assert torch.equal(s.label, expected)
    assert (s.label[0, :3] == 0).all()
    m = DepthMetrics()
    m.update(s.label, s.label)
    assert m.compute().rmse == 0 and m.num_pixels == H * W - 3


def _write_mat73(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """A MATLAB v7.3 file: HDF5 behind a 512-byte MATLAB header (version 0x0200, 'IM')."""
    h5py = pytest.importorskip("h5py")
    with h5py.File(path, "w", userblock_size=512) as f:
        for key, value in arrays.items():
            f[key] = value
    header = b"MATLAB 7.3 MAT-file, written by a test".ljust(116) + bytes(8) + b"\x00\x02IM"
    with open(path, "r+b") as f:
        f.write(header)


def test_nyuv2_labeled_mat_transposes_and_uses_official_split(tmp_path):
    pytest.importorskip("h5py")
    scipy_io = pytest.importorskip("scipy.io")
    n = 5
    images = np.random.default_rng(0).integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    depths = np.stack([_nyu_depth(i) for i in range(n)])
    mat = tmp_path / "nyu_depth_v2_labeled.mat"
    # MATLAB column-major arrays arrive in h5py as (N, 3, W, H) and (N, W, H)
    _write_mat73(mat, {"images": images.transpose(0, 3, 2, 1), "depths": depths.transpose(0, 2, 1)})
    scipy_io.savemat(
        tmp_path / "splits.mat",
        {"trainNdxs": np.array([[1], [2], [4]]), "testNdxs": np.array([[3], [5]])},
    )

    test = create_dataset(f"nyuv2:root={mat}:split=test")
    assert test.names == ["0002", "0004"] and len(test) == 2
    s = test[1]
    assert s.image.shape == (3, H, W) and s.label.shape == (H, W)
    assert torch.equal(s.image, torch.from_numpy(images[4]).permute(2, 0, 1).float() / 255)
    assert torch.equal(s.label, torch.from_numpy(depths[4]))
    assert s.image_path == mat
    train = create_dataset(f"nyuv2:root={mat}:split=train")
    assert train.names == ["0000", "0001", "0003"]
    assert create_dataset(f"nyuv2:root={mat}:split=all").names == [f"{i:04d}" for i in range(n)]
    assert create_dataset(str(mat).join(["nyuv2:root=", ":indices=4"])).names == ["0004"]

    m = DepthMetrics()
    m.update(s.label + 0.1 * (s.label > 0), s.label)
    valid = s.label > 0
    assert m.num_pixels == int(valid.sum()) == H * W - 3
    assert m.compute().rmse == pytest.approx(0.1, rel=1e-5)

    # a v7.3 copy of splits.mat (HDF5, 1-based (1, n) rows) is read through h5py
    _write_mat73(
        tmp_path / "splits73.mat", {"trainNdxs": np.array([[1, 5]]), "testNdxs": np.array([[2]])}
    )
    split73 = create_dataset(f"nyuv2:root={mat}:split=train:split_file={tmp_path / 'splits73.mat'}")
    assert split73.names == ["0000", "0004"]

    (tmp_path / "junk.mat").write_bytes(b"not a mat file")
    with pytest.raises(InputError, match="could not be read as a MATLAB file"):
        create_dataset(f"nyuv2:root={mat}:split=test:split_file={tmp_path / 'junk.mat'}")
    (tmp_path / "splits.mat").unlink()
    with pytest.raises(InputError, match="split_file="):
        create_dataset(f"nyuv2:root={mat}:split=test")
    with pytest.raises(InputError, match="not a MATLAB v7.3"):
        create_dataset(f"nyuv2:root={tmp_path / 'junk.mat'}:split=all")
    with pytest.raises(InputError, match="out of range"):
        create_dataset(f"nyuv2:root={mat}:indices=5")
