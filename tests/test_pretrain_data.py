"""Pretraining data: image folders, reproducible views, the process-independent sampler."""

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.data.imagesets import ImageFolderDataset
from hbird.errors import InputError
from hbird.pretrain.augment import ViewSpec, augment_view, byol_views, crop_box
from hbird.pretrain.data import (
    EpochSampler,
    ImageFolder,
    SyntheticImages,
    ViewDataset,
    collate,
    create_image_dataset,
    sample_generator,
)


def write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8)).save(path)


def test_image_folder_with_class_subfolders(tmp_path):
    write_png(tmp_path / "cat" / "a.png", 10)
    write_png(tmp_path / "cat" / "deep" / "b.png", 20)
    write_png(tmp_path / "dog" / "c.jpg", 30)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = create_image_dataset(f"imagefolder:root={tmp_path}")
    assert (
        isinstance(ds.dataset, ImageFolderDataset) and ds.classes == ("cat", "dog") and len(ds) == 3
    )
    labels = [ds[i][1] for i in range(3)]
    assert labels == [0, 0, 1]
    image, _ = ds[0]
    assert image.shape == (3, 12, 10) and image.max() <= 1.0


def test_image_folder_without_classes_is_unlabelled(tmp_path):
    write_png(tmp_path / "x.png", 1)
    write_png(tmp_path / "y.png", 2)
    ds = ImageFolder(tmp_path)
    assert ds.num_classes == 0 and [ds[i][1] for i in range(2)] == [-1, -1]


def test_bad_data_specs_are_explained(tmp_path):
    with pytest.raises(InputError, match="no images found"):
        ImageFolder(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(InputError, match="unknown pretraining data"):
        create_image_dataset("imagenet:root=/x")
    with pytest.raises(InputError, match="bad arguments"):
        create_image_dataset("synthetic:n=4:colour=red")


def test_synthetic_images_are_make_scenes_drawn_lazily():
    from hbird.data.synthetic import make_scenes

    ds = SyntheticImages(n=6, seed=0, size=32, classes=4, colour_jitter=0.3)
    reference = make_scenes(6, 0, num_classes=4, size=(32, 32), colour_jitter=0.3)
    assert ds.num_classes == 3 and [ds[i][1] for i in range(6)] == [0, 1, 2, 0, 1, 2]
    for i in range(6):
        assert torch.equal(ds[i][0], reference[i].image)
        assert bool((reference[i].mask == ds[i][1] + 1).any())  # the label's shape is there


def test_views_depend_only_on_seed_epoch_and_index():
    images = SyntheticImages(n=4, seed=1, size=40)
    data = ViewDataset(images, byol_views(32), seed=7)
    a, b = data[2], data[2]
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"]))
    assert not torch.equal(a["views"][0], a["views"][1])
    data.set_epoch(1)
    assert not torch.equal(data[2]["views"][0], a["views"][0])
    batch = collate([data[i] for i in range(4)])
    assert [tuple(v.shape) for v in batch.views] == [(4, 3, 32, 32)] * 2
    assert batch.labels.tolist() == [0, 1, 2, 0] and batch.masks is None


def test_augment_view_without_randomness_is_a_resize():
    image = torch.rand(3, 20, 20)
    spec = ViewSpec(10, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0, jitter=0, grayscale=0, blur=0)
    out = augment_view(image, spec, torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(
        image[None], size=(10, 10), mode="bilinear", antialias=True, align_corners=False
    )[0]
    torch.testing.assert_close(out, expected.clamp(0, 1))


def test_crop_box_respects_scale_and_bounds():
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(40, 60, (0.2, 0.5), (3 / 4, 4 / 3), gen)
        assert 0 <= top and top + h <= 40 and 0 <= left and left + w <= 60
        assert 0.15 <= h * w / 2400 <= 0.55


def test_sample_generator_is_stable():
    a = torch.rand(3, generator=sample_generator(0, 1, 2))
    b = torch.rand(3, generator=sample_generator(0, 1, 2))
    c = torch.rand(3, generator=sample_generator(0, 1, 3))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_epoch_sampler_gives_every_world_size_the_same_global_batches():
    single = list(EpochSampler(20, 8, seed=3))
    halves = [list(EpochSampler(20, 8, rank=r, world_size=2, seed=3)) for r in range(2)]
    assert len(single) == 16  # 2 full global batches, the remainder is dropped
    for t in range(2):
        assert (
            single[8 * t : 8 * t + 8] == halves[0][4 * t : 4 * t + 4] + halves[1][4 * t : 4 * t + 4]
        )
    sampler = EpochSampler(20, 8, seed=3)
    sampler.set_position(epoch=0, start_batch=1)
    assert list(sampler) == single[8:] and len(sampler) == 8
    sampler.set_position(epoch=1)
    assert list(sampler) != single  # a new shuffle each epoch


def test_epoch_sampler_refuses_too_little_data():
    with pytest.raises(InputError, match="fewer than one global batch"):
        EpochSampler(4, 8)
    with pytest.raises(ValueError, match="divisible"):
        EpochSampler(20, 9, world_size=2)
