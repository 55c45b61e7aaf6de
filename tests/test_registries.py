"""Every entry of every registry keeps its registry's contract.

Like timm's tests/test_models.py over ``list_models()``, each test walks the registry
itself, never a hand-written list. Each entry needs a tiny case below (a fixture, tiny
settings); ``test_every_entry_has_a_case`` fails when an entry is registered without one,
so no new entry can skip the contract. The FUNGI loss contract (batched per-sample
gradients equal per-sample autograd) walks ``LOSSES`` in test_fungi_gradients.py; the
feature-extractor registry has its own test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hbird import _optional
from hbird.data import DATASETS, DenseDataset, create_dataset
from hbird.data.panoptic_synthetic import make_panoptic_scenes
from hbird.data.synthetic import make_scenes, write_scene_folder
from hbird.encoders import create_encoder
from hbird.encoders.hf_backend import FAMILIES
from hbird.encoders.registry import ENCODERS
from hbird.index import INDEXES, create_index, load_index
from hbird.pretrain import Batch, build_backbone, create_objective
from hbird.pretrain.backbone import ViTBackbone
from hbird.pretrain.data import SyntheticImages, ViewDataset, collate
from hbird.pretrain.objective import OBJECTIVES
from hbird.pretrain.presets import TINY_ARCH, TINY_OBJECTIVE_OPTIONS, TINY_VIT_KWARGS, tiny_options
from hf_models import save_tiny

H, W = 16, 24

# ======================================================================= indexes

INDEX_CASES = {  # kind: (optional module it needs, tiny constructor parameters)
    "exact": (None, {}),
    "flat": ("faiss", {}),
    "hnsw": ("faiss", {"m": 8, "ef_construction": 64, "ef_search": 64}),
    "ivfpq": ("faiss", {"nlist": 4, "m": 4, "nprobe": 4}),
    "ivfmm": ("faiss", {"nlist": 4, "nprobe": 4}),
    "scann": ("scann", {"num_leaves": 4, "leaves_to_search": 4, "brute_force_below": 1}),
}


def unit_rows(n: int, dim: int, seed: int) -> torch.Tensor:
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.normalize(x, dim=1)


@pytest.mark.parametrize("kind", INDEXES.names())
def test_index_contract(kind: str, tmp_path: Path) -> None:
    """Search against brute-force inner products; a saved index answers as it did."""
    needs, params = INDEX_CASES[kind]
    if needs is not None and not _optional.is_available(needs):
        pytest.skip(f"{needs} is not installed")
    keys, queries, k = unit_rows(500, 16, 0), unit_rows(12, 16, 1), 10
    index = create_index(kind, 16, **params)
    assert index.kind == kind and index.ntotal == 0
    index.fill(keys)
    assert index.ntotal == 500 and index.is_trained
    sims, ids = index.search(queries, k)
    assert sims.shape == ids.shape == (12, k) and ids.dtype == torch.int64
    assert bool(((ids >= 0) & (ids < 500)).all())
    assert bool((sims[:, :-1] >= sims[:, 1:] - 1e-6).all()), "results must be sorted best first"
    oracle = queries @ keys.T  # (Q, N) what every backend approximates
    kth_best = oracle.topk(k, dim=1).values[:, -1:]
    found = oracle.gather(1, ids)  # the true similarity of every returned key
    # tie-safe recall: a returned key counts if it is as similar as the k-th best one
    assert float((found >= kth_best - 1e-5).float().mean()) >= 0.9
    assert all(len(set(row.tolist())) == k for row in ids), "a key is returned twice"
    if kind in ("exact", "flat"):
        assert torch.allclose(sims, oracle.topk(k, dim=1).values, atol=1e-5)
        assert torch.allclose(found, sims, atol=1e-5)
    saved = load_index(index.save(tmp_path / "index"))
    assert type(saved) is type(index) and saved.ntotal == 500 and saved.params() == index.params()
    sims2, ids2 = saved.search(queries, k)
    assert torch.equal(ids2, ids) and torch.allclose(sims2, sims, atol=1e-6)


# ======================================================================= encoders

TINY_TIMM = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
HF_KINDS = {  # hf: family (config.model_type) -> tests/hf_models.py builder
    "vit": "vit",
    "dinov2": "dinov2",
    "dinov2_with_registers": "dinov2_reg",
    "clip": "clip",
    "clip_vision_model": "clip_vision",
}
ENCODER_CASES = {  # case: (registry entry it exercises, name, kwargs; a folder for hf:)
    "test_vit": ("test_vit", "test_vit", {}),
    "test_vit_reg": ("test_vit_reg", "test_vit_reg", {}),
    "test_vit_p16": ("test_vit_p16", "test_vit_p16", {}),
    "timm": (None, "vit_tiny_patch16_224", TINY_TIMM),
    "test_axial": ("test_axial", "test_axial", {}),
    "test_elastic": ("test_elastic", "test_elastic", {}),
    **{  # the ELASTIC models at a cheap width and depth (their layout: tests/test_elastic.py)
        name: (name, name, {"layers": (2, 2, 2, 1), "planes": (16, 32, 64, 128), "stem_width": 16})
        for name in ("elastic_resnext50", "selastic_resnext50", "elastic_resnet50")
    },
    **{  # the registered names at a cheap depth and width (their layout: tests/test_axial.py)
        name: (name, name, {"depths": (1, 1, 1, 1), "width": 1 / 8, "pretrained": False})
        for name in (
            f"{a}_{s}" for a in ("axial_resnet", "axial_deeplab") for s in "s m l xl".split()
        )
    },
    **{f"hf:{family}": ("hf:", family, {"pretrained": True}) for family in HF_KINDS},
}


def build_case(case: str, tmp_path: Path):
    _, name, kwargs = ENCODER_CASES[case]
    if case.startswith("hf:"):
        pytest.importorskip("transformers")
        folder = tmp_path / name
        if not folder.is_dir():
            save_tiny(folder, HF_KINDS[name])
        name = f"hf:{folder}"
    torch.manual_seed(0)  # a plain timm model draws its random weights from the global RNG
    return create_encoder(name, **kwargs), name, kwargs


def _first_bias(model: torch.nn.Module) -> torch.Tensor:
    """A ViT's first MLP bias; a staged backbone's first bias (its stem BN's)."""
    if hasattr(model, "blocks"):
        return model.blocks[0].mlp.fc1.bias
    return next(p for n, p in model.named_parameters() if n.endswith("bias"))


@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_contract(case: str, tmp_path: Path) -> None:
    """Frozen, (B, h, w, D) per layer, batch-independent, deterministic, weights round-trip."""
    encoder, name, kwargs = build_case(case, tmp_path)
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    p, d = encoder.patch_size, encoder.embed_dim
    images = torch.rand(3, 3, 2 * p, 3 * p, generator=torch.Generator().manual_seed(0))
    x = encoder.normalize(images)
    with torch.no_grad():
        both = encoder(x, layers=[0, -1])
        first, last = encoder(x, layers=0), encoder(x)
        alone = encoder(x[1:2])
    d0 = encoder.feature_dim(0)  # = d for transformers; a staged backbone's first stage is narrower
    assert last.shape[-1] == d and (d0 == d or hasattr(encoder, "stage_channels"))
    assert both.shape == (3, 2, 3, d0 + d) and encoder.feature_dim([0, -1]) == d0 + d
    assert torch.isfinite(both).all()
    assert torch.allclose(both, torch.cat([first, last], dim=-1))
    assert torch.allclose(alone[0], last[1], atol=1e-5), "an image's features depend on its batch"
    assert not torch.allclose(last[0], last[1]), "features do not depend on the image"
    again, _, _ = build_case(case, tmp_path)
    assert again.identity() == encoder.identity()
    if hasattr(encoder, "model") and not name.startswith("hf:"):  # weights files: timm-backed
        path = tmp_path / "weights.pth"
        with torch.no_grad():
            _first_bias(encoder.model).add_(1.0)
            changed = encoder(x)
        torch.save(encoder.model.state_dict(), path)
        loaded = create_encoder(name, weights=path, **kwargs)
        assert loaded.identity()["weights_hash"] == encoder.identity()["weights_hash"]
        assert loaded.identity()["weights_hash"] != again.identity()["weights_hash"]
        with torch.no_grad():
            assert torch.equal(loaded(x), changed)


# ======================================================================= datasets


def _rgb(path: Path, seed: int) -> None:
    arr = np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _blocks(values: list[int], seed: int) -> np.ndarray:
    """``(H, W)`` uint8 holding each of ``values`` (in random blocks)."""
    arr = np.asarray(values, dtype=np.uint8)[
        np.random.default_rng(seed).integers(0, len(values), (H, W))
    ]
    arr.flat[: len(values)] = values
    return arr


def _lut(raw: np.ndarray, mapping: dict[int, int]) -> torch.Tensor:
    return torch.from_numpy(np.vectorize(mapping.__getitem__)(raw).astype(np.int64))


# Each case writes a tiny layout and returns (spec, names, label of the first sample as
# the dataset's documented convention gives it, computed here by hand).


def voc_case(root: Path):
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\n")
    raw = _blocks([0, 15, 255], 0)
    for i, stem in enumerate("ab"):
        _rgb(root / "JPEGImages" / f"{stem}.jpg", i)
        _png(root / "SegmentationClass" / f"{stem}.png", raw)
    return f"voc:root={root}:split=val", ["a", "b"], torch.from_numpy(raw.astype(np.int64))


def ade20k_case(root: Path):
    raw = _blocks([0, 1, 150], 1)  # 0 = "other" -> ignored; ids shift down by one
    for i, stem in enumerate(["ADE_val_1", "ADE_val_2"]):
        _rgb(root / "images" / "validation" / f"{stem}.jpg", i)
        _png(root / "annotations" / "validation" / f"{stem}.png", raw)
    return (
        f"ade20k:root={root}:split=val",
        ["ADE_val_1", "ADE_val_2"],
        _lut(raw, {0: 255, 1: 0, 150: 149}),
    )


def cityscapes_case(root: Path):
    raw = _blocks([7, 26, 0], 2)  # label ids: road -> 0, car -> 13, unlabelled -> ignored
    stem = "aachen_000000_000019"
    _rgb(root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png", 0)
    _png(root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_labelIds.png", raw)
    return f"cityscapes:root={root}:split=val", [stem], _lut(raw, {7: 0, 26: 13, 0: 255})


def cocostuff_case(root: Path):
    raw = _blocks([0, 1, 10, 255], 3)  # thing ids below the first unused one keep their id
    _rgb(root / "images" / "val2017" / "000000000139.jpg", 0)
    _png(root / "stuffthingmaps" / "val2017" / "000000000139.png", raw)
    return (
        f"cocostuff:root={root}:split=val",
        ["000000000139"],
        torch.from_numpy(raw.astype(np.int64)),
    )


def kitti_step_case(root: Path):
    raw = _blocks([0, 13, 255], 7)  # R channel = class id; G, B = instance id
    rgb = np.stack([raw, raw // 8, np.full_like(raw, 3)], axis=-1)
    _rgb(root / "images" / "val" / "0002" / "000000.png", 0)
    _png(root / "panoptic_maps" / "val" / "0002" / "000000.png", rgb)
    return (
        f"kitti_step:root={root}:split=val",
        ["0002_000000"],
        torch.from_numpy(raw.astype(np.int64)),
    )


def nyuv2_case(root: Path):
    mm = np.random.default_rng(4).integers(500, 9500, (H, W)).astype(np.uint16)
    _rgb(root / "test" / "images" / "00001.jpg", 0)
    _png(root / "test" / "depth" / "00001.png", mm)
    return (
        f"nyuv2:root={root}:split=test",
        ["00001"],
        torch.from_numpy(mm.astype(np.float32) / 1000),
    )


def folder_case(root: Path):
    scenes = make_scenes(2, seed=5, num_classes=4, size=(H, W))
    write_scene_folder(root, scenes, with_depth=False, prefix="s")
    return f"folder:root={root}", ["s_0000", "s_0001"], scenes[0].mask


def synthetic_case(root: Path):
    scenes = make_scenes(3, seed=6, num_classes=5, size=(32, 32), noise=0.0)
    return (
        "synthetic:n=3:seed=6:size=32:classes=5:noise=0.0",
        ["synthetic_00000", "synthetic_00001", "synthetic_00002"],
        scenes[0].mask,
    )


def imagefolder_case(root: Path):
    _rgb(root / "cat" / "a.png", 0)
    _rgb(root / "dog" / "b.png", 1)
    return f"imagefolder:root={root}", ["cat/a", "dog/b"], torch.zeros((H, W), dtype=torch.int64)


def cityscapes_panoptic_case(root: Path):
    # instance ids: road (label id 7), car 26 instance 1 (26001), a car crowd (26), void (0)
    raw = _blocks([7, 26, 0], 7).astype(np.uint16)  # a 16-bit PNG, as distributed
    raw[raw == 26] = 26001
    raw[0, :3] = 26
    stem = "aachen_000000_000019"
    _rgb(root / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png", 0)
    _png(root / "gtFine" / "val" / "aachen" / f"{stem}_gtFine_instanceIds.png", raw)
    semantic = _lut(raw, {7: 0, 26001: 13, 26: 13, 0: 255})
    return f"cityscapes_panoptic:root={root}:split=val", [stem], semantic


def coco_panoptic_case(root: Path):
    # segment ids 1 (a stuff category 200) and 300 = R 44 + 256 G 1 (a thing category 1)
    ids = _blocks([0, 1, 2], 8)
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[ids == 1] = (1, 0, 0)
    rgb[ids == 2] = (44, 1, 0)
    _rgb(root / "val2017" / "000000000139.jpg", 0)
    _png(root / "annotations" / "panoptic_val2017" / "000000000139.png", rgb)
    categories = [
        {"id": 1, "name": "person", "isthing": 1},
        {"id": 200, "name": "sky", "isthing": 0},
    ]
    segments = [
        {"id": 1, "category_id": 200, "iscrowd": 0},
        {"id": 300, "category_id": 1, "iscrowd": 0},
    ]
    record = {"file_name": "000000000139.png", "segments_info": segments}
    (root / "annotations" / "panoptic_val2017.json").write_text(
        json.dumps({"categories": categories, "annotations": [record]})
    )
    semantic = _lut(ids, {0: 255, 1: 1, 2: 0})  # categories in id order: person 0, sky 1
    return f"coco_panoptic:root={root}:split=val", ["000000000139"], semantic


def kitti_step_panoptic_case(root: Path):
    classes = _blocks([0, 13, 255], 9)
    rgb = np.stack([classes, np.zeros_like(classes), (classes == 13).astype(np.uint8)], -1)
    _rgb(root / "images" / "val" / "0002" / "000000.png", 0)
    _png(root / "panoptic_maps" / "val" / "0002" / "000000.png", rgb)
    semantic = torch.from_numpy(classes.astype(np.int64))
    return f"kitti_step_panoptic:root={root}:split=val", ["0002_000000"], semantic


def synthetic_panoptic_case(root: Path):
    scenes = make_panoptic_scenes(2, seed=3, size=(32, 32))
    names = ["panoptic_00000", "panoptic_00001"]
    return "synthetic_panoptic:n=2:seed=3:size=32", names, scenes[0].semantic


DATASET_CASES = {
    "cityscapes_panoptic": cityscapes_panoptic_case,
    "coco_panoptic": coco_panoptic_case,
    "kitti_step_panoptic": kitti_step_panoptic_case,
    "synthetic_panoptic": synthetic_panoptic_case,
    "voc": voc_case,
    "ade20k": ade20k_case,
    "cityscapes": cityscapes_case,
    "cocostuff": cocostuff_case,
    "kitti_step": kitti_step_case,
    "nyuv2": nyuv2_case,
    "folder": folder_case,
    "synthetic": synthetic_case,
    "imagefolder": imagefolder_case,
}


@pytest.mark.parametrize("name", DATASETS.names())
def test_dataset_contract(name: str, tmp_path: Path) -> None:
    """Samples as documented, labels in the train-id convention, subsets keep samples."""
    spec, names, first_label = DATASET_CASES[name](tmp_path / name)
    ds = create_dataset(spec)
    assert isinstance(ds, DenseDataset) and len(ds) == len(names) and ds.names == names
    label_spec = ds.label_spec
    for sample in ds:
        image, label = sample.image, sample.label
        assert image.dtype == torch.float32 and image.ndim == 3 and image.shape[0] == 3
        assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
        assert label.shape == image.shape[1:]
        if label_spec.task == "segmentation":
            valid = (label >= 0) & (label < label_spec.num_classes)
            assert label.dtype == torch.int64 and bool(
                (valid | (label == label_spec.ignore_index)).all()
            )
        else:
            assert label.dtype == torch.float32
    assert torch.equal(ds[0].label, first_label)
    last = ds.subset([len(ds) - 1])
    assert last.names == names[-1:] and torch.equal(last[0].label, ds[-1].label)
    assert len(ds.image_labels) == len(ds)
    assert all(-1 <= c < len(ds.image_classes) for c in ds.image_labels)
    assert create_dataset(spec, fraction=1.0).names == names


def test_imagefolder_and_synthetic_image_labels(tmp_path: Path) -> None:
    spec, _, _ = imagefolder_case(tmp_path)
    ds = create_dataset(spec)
    assert ds.image_classes == ("cat", "dog") and ds.image_labels == [0, 1]
    assert torch.equal(ds[1].label, torch.ones((H, W), dtype=torch.int64))
    synthetic = create_dataset("synthetic:n=5:classes=4")
    assert synthetic.image_labels == [0, 1, 2, 0, 1]  # scene i always holds shape 1 + i % 3
    assert all(
        bool((synthetic[i].label == c + 1).any()) for i, c in enumerate(synthetic.image_labels)
    )


# ======================================================================= objectives


@pytest.fixture(scope="module")
def pretrain_images():
    return SyntheticImages(n=4, seed=3, size=48)


def make_objective(name: str):
    torch.manual_seed(0)
    backbone = build_backbone(TINY_ARCH, TINY_VIT_KWARGS, seed=0)
    extra = {"num_classes": 3} if OBJECTIVES.get(name).needs_labels else {}
    return create_objective(name, backbone, tiny_options(name), **extra)


@pytest.mark.parametrize("name", OBJECTIVES.names())
def test_objective_contract(name: str, pretrain_images, tmp_path: Path) -> None:
    """A finite scalar loss that trains the backbone, reproducible, and a state round trip."""
    objective = make_objective(name)
    assert objective.name == name
    data = ViewDataset(pretrain_images, objective.views(32), seed=0)
    raw = collate([data[i] for i in range(4)])
    batch = Batch([objective.backbone.normalize(v) for v in raw.views], raw.labels, raw.masks)
    losses = objective(batch, progress=0.0)
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None for p in objective.backbone.parameters())
    # no weight decay: what the timm model itself names, under its path in the objective
    params = dict(objective.named_parameters())
    skip = objective.no_weight_decay()
    assert skip <= set(params)
    prefix = next(n for n, m in objective.named_modules() if m is objective.backbone.model)
    assert {f"{prefix}.{n}" for n in ("pos_embed", "cls_token")} <= skip
    objective.after_step(0.5)
    saved = tmp_path / "state.pt"
    torch.save(objective.state_dict(), saved)
    fresh = make_objective(name)
    fresh.load_state_dict(torch.load(saved))
    with torch.no_grad():
        assert torch.equal(
            fresh(batch, progress=0.5)["loss"], objective(batch, progress=0.5)["loss"]
        )
    assert isinstance(fresh.export_backbone(), ViTBackbone)


# ======================================================================= coverage


def test_every_entry_has_a_case() -> None:
    """A newly registered entry must come with its tiny case here (or in the presets)."""
    assert sorted(INDEX_CASES) == INDEXES.names()
    assert {entry for entry, _, _ in ENCODER_CASES.values() if entry} == set(ENCODERS.names())
    assert sorted(HF_KINDS) == sorted(FAMILIES)
    assert sorted(DATASET_CASES) == DATASETS.names()
    assert sorted(TINY_OBJECTIVE_OPTIONS) == OBJECTIVES.names()
