"""The ReCo benchmarks' label conventions: Cityscapes-27, COCO-Stuff 171 → 27, KITTI-STEP.

Every expected value is written out by hand from the dataset's published convention
(cityscapesScripts ``labels.py``; the COCO-Stuff hierarchy; deeplab2's ``kitti_step.md``),
not computed with the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data import create_dataset
from hbird.data.datasets import CITYSCAPES27_CLASSES, clip_name, cocostuff_vocabulary
from hbird.data.vocabulary import Vocabulary, vocabulary_of
from hbird.errors import InputError

H, W = 6, 8


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _rgb(path: Path, seed: int = 0) -> None:
    _png(path, np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))


# ----------------------------------------------------------------------- Cityscapes-27


def _cityscapes(root: Path, raw: np.ndarray, kind: str = "labelIds") -> str:
    stem = "frankfurt_000000_000294"
    _rgb(root / "leftImg8bit" / "val" / "frankfurt" / f"{stem}_leftImg8bit.png")
    _png(root / "gtFine" / "val" / "frankfurt" / f"{stem}_gtFine_{kind}.png", raw)
    return stem


def test_cityscapes27_is_label_ids_minus_seven(tmp_path: Path) -> None:
    """STEGO / ReCo protocol: labelIds 7..33 → 0..26; 0..6 (void, ego vehicle, ...) and
    255 (the license plate's -1 as written to PNG) → ignored."""
    raw = np.array([[0, 6, 7, 8, 9, 10, 11, 17], [18, 21, 23, 24, 26, 31, 33, 255]], np.uint8)
    raw = np.tile(raw, (3, 1))
    _cityscapes(tmp_path, raw)
    ds = create_dataset(f"cityscapes:root={tmp_path}:split=val:classes=27")
    expected = np.array(
        [[255, 255, 0, 1, 2, 3, 4, 10], [11, 14, 16, 17, 19, 24, 26, 255]], np.int64
    )
    assert torch.equal(ds[0].label, torch.from_numpy(np.tile(expected, (3, 1))))
    spec = ds.label_spec
    assert spec.num_classes == 27 and spec.ignore_index == 255
    # names by label id (cityscapesScripts): 9 parking, 10 rail track, 18 polegroup,
    # 21 vegetation, 26 car, 33 bicycle
    names = spec.class_names
    assert (names[2], names[3], names[11], names[14], names[19], names[26]) == (
        "parking",
        "rail track",
        "pole group",
        "vegetation",
        "car",
        "bicycle",
    )
    assert names == CITYSCAPES27_CLASSES and len(set(names)) == 27


def test_cityscapes27_needs_label_ids(tmp_path: Path) -> None:
    _cityscapes(tmp_path, np.zeros((H, W), np.uint8), kind="labelTrainIds")
    with pytest.raises(InputError, match="_labelIds.png"):
        create_dataset(f"cityscapes:root={tmp_path}:split=val:classes=27")
    with pytest.raises(InputError, match="classes=19 or classes=27"):
        create_dataset(f"cityscapes:root={tmp_path}:split=val:classes=30")


# ----------------------------------------------------------------------- COCO-Stuff


def test_cocostuff_vocabulary_maps_171_names_to_supercategories() -> None:
    """ReCo predicts COCO-Stuff-27 over the 171 names; each winner becomes its
    supercategory (COCO-Stuff hierarchy; 27-class order of PiCIE/STEGO)."""
    coarse = cocostuff_vocabulary(27)
    assert len(coarse.names) == 171 and len(set(coarse.names)) == 171
    by_name = dict(zip(coarse.names, coarse.to_label.tolist()))
    # 27-class ids: person 9, vehicle 11, animal 7, furniture-stuff 15, textile 17,
    # wall 18, ground 21, plant 22, sky 23
    hand = {
        "person": 9,
        "car": 11,
        "giraffe": 7,
        "desk": 15,  # desk-stuff
        "banner": 17,
        "wall brick": 18,
        "wall": 18,  # wall-other
        "road": 21,
        "tree": 22,
        "sky": 23,  # sky-other
        "clouds": 23,
    }
    assert {k: by_name[k] for k in hand} == hand
    assert coarse.names[0] == "person" and coarse.names[80] == "banner"  # first stuff name
    fine = cocostuff_vocabulary(171)
    assert fine.names == coarse.names and fine.to_label.tolist() == list(range(171))
    # predictions outside the vocabulary are ignored, never class 0
    pred = torch.tensor([[0, 170, 171, -1]])
    assert coarse.to_labels(pred).tolist() == [[9, coarse.to_label[170].item(), 255, 255]]


def test_clip_names() -> None:
    assert [clip_name(n) for n in ("sky-other", "desk-stuff", "wall-brick", "tv")] == [
        "sky",
        "desk",
        "wall brick",
        "tv",
    ]


def test_cocostuff27_labels_keep_unlabelled_as_ignore(tmp_path: Path) -> None:
    """Raw stuffthingmaps 255 (unlabelled) stays ignored in 27-class mode (not class 0,
    electronic); raw 0 person → 9, raw 2 car → 11, raw 92 banner → textile 17,
    raw 156 (sky-other) → sky 23."""
    raw = np.tile(np.array([0, 2, 92, 156, 255, 255, 0, 2], np.uint8), (H, 1))
    _rgb(tmp_path / "images" / "val2017" / "000000000285.jpg")
    _png(tmp_path / "stuffthingmaps" / "val2017" / "000000000285.png", raw)
    ds = create_dataset(f"cocostuff:root={tmp_path}:split=val:classes=27")
    assert ds[0].label[0].tolist() == [9, 11, 17, 23, 255, 255, 9, 11]
    assert vocabulary_of(ds).names == cocostuff_vocabulary(27).names


def test_vocabulary_of_plain_dataset_is_its_classes(tmp_path: Path) -> None:
    ds = create_dataset("synthetic:n=2:size=16:classes=3")
    vocab = vocabulary_of(ds)
    assert vocab.names == ("background", "disc", "box")
    assert vocab.to_labels(torch.tensor([2, 0, 3])).tolist() == [2, 0, 255]
    with pytest.raises(ValueError, match="unique"):
        Vocabulary(("a", "a"), torch.tensor([0, 1]))


# ----------------------------------------------------------------------- KITTI-STEP


def _panoptic(path: Path, semantic: np.ndarray, seed: int = 0) -> None:
    instance = np.random.default_rng(seed).integers(0, 2000, semantic.shape)
    rgb = np.stack([semantic, instance // 256, instance % 256], axis=-1).astype(np.uint8)
    _png(path, rgb)


def test_kitti_step_semantic_is_the_red_channel(tmp_path: Path) -> None:
    """deeplab2 kitti_step.md: R = semantic id (Cityscapes train ids), G·256 + B = instance."""
    semantic = np.tile(np.array([0, 13, 11, 255, 10, 18, 0, 13], np.uint8), (H, 1))
    _panoptic(tmp_path / "panoptic_maps" / "val" / "0002" / "000000.png", semantic)
    _panoptic(tmp_path / "panoptic_maps" / "val" / "0002" / "000001.png", semantic[:, ::-1], 1)
    for frame in ("000000", "000001"):
        _rgb(tmp_path / "images" / "val" / "0002" / f"{frame}.png")
    ds = create_dataset(f"kitti_step:root={tmp_path}:split=val")
    assert ds.names == ["0002_000000", "0002_000001"]
    assert ds[0].label[0].tolist() == [0, 13, 11, 255, 10, 18, 0, 13]
    assert ds[1].label[0].tolist() == [13, 0, 18, 10, 255, 11, 13, 0]
    assert ds.label_spec.class_names[13] == "car" and ds.label_spec.num_classes == 19


def test_kitti_step_reads_kitti_image_layout_and_refuses_bad_input(tmp_path: Path) -> None:
    semantic = np.full((H, W), 8, np.uint8)
    _panoptic(tmp_path / "panoptic_maps" / "train" / "0001" / "000004.png", semantic)
    _rgb(tmp_path / "training" / "image_02" / "0001" / "000004.png")
    ds = create_dataset(f"kitti_step:root={tmp_path}:split=train")
    assert ds[0].label.unique().tolist() == [8]
    with pytest.raises(InputError, match="test split has no labels"):
        create_dataset(f"kitti_step:root={tmp_path}:split=test")
    _panoptic(tmp_path / "panoptic_maps" / "train" / "0001" / "000005.png", semantic + 30)
    _rgb(tmp_path / "training" / "image_02" / "0001" / "000005.png")
    with pytest.raises(InputError, match="R channel"):
        create_dataset(f"kitti_step:root={tmp_path}:split=train")[1]
    _panoptic(tmp_path / "panoptic_maps" / "train" / "0001" / "000006.png", semantic)
    with pytest.raises(InputError, match="needs its image"):
        create_dataset(f"kitti_step:root={tmp_path}:split=train")


# ----------------------------------------------------------------------- eval over a vocabulary


@pytest.mark.slow
def test_reco_eval_maps_a_finer_vocabulary_to_the_labels(tmp_path: Path) -> None:
    """``hbird eval --protocol reco`` on a dataset with a vocabulary (as COCO-Stuff-27 over
    its 171 names): references built for the vocabulary's names, each prediction mapped
    to its label id before scoring. Here the toy world's 5 names map to 2 labels (gray →
    ground 0, every colour → object 1); the score equals a confusion matrix of the mapped
    predictions computed here."""
    from hbird.data.synthetic import SyntheticScene, write_scene_folder
    from hbird.eval.reco import evaluate_reco
    from hbird.metrics.segmentation import ConfusionMatrix
    from hbird.zeroshot import toy
    from hbird.zeroshot.collection import ImageCollection
    from hbird.zeroshot.reco import ReCo

    clip = toy.ToyClip()
    root = write_scene_folder(tmp_path / "c", toy.make_scenes(30, seed=0), toy.CLASSES, False)
    coll = ImageCollection.build(root / "images", clip, tmp_path / "coll", progress=False)
    settings = {"k": 8, "image_size": 48, "contexts": ("gray",)}
    reco = ReCo(
        collection=coll, encoder=toy.ToyEncoder(), dense_clip=clip, progress=False, **settings
    )
    reco.build(list(toy.CLASSES)).save(tmp_path / "refs")
    scenes = [toy.make_scene(1, i, objects=[1 + i % 4], sizes=(12, 20)) for i in range(3)]
    binary = [SyntheticScene(s.image, (s.mask > 0).long(), s.depth, 2) for s in scenes]
    write_scene_folder(tmp_path / "bench" / "val", binary, ("ground", "object"), False)
    ds = create_dataset(f"folder:root={tmp_path / 'bench'}:split=val")
    ds.vocabulary = Vocabulary(toy.CLASSES, torch.tensor([0, 1, 1, 1, 1]))
    report = evaluate_reco(
        tmp_path / "refs", ds, encoder=toy.ToyEncoder(), collection=coll, progress=False
    )
    expected = ConfusionMatrix(2, 255)
    for sample in ds:
        expected.update(
            torch.tensor([0, 1, 1, 1, 1])[reco.predict([sample.image])[0]], sample.label
        )
    assert report.metrics["miou"] == pytest.approx(expected.compute().miou)
    assert 0.5 < report.metrics["miou"] <= 1.0
