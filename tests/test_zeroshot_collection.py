"""The CLIP image collection (issue 11, step 2): a bank-like folder, searched through
hbird.index, refusing another CLIP, resuming an interrupted build."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from hbird.io.images import load_image
from hbird.zeroshot.clip import create_clip
from hbird.zeroshot.collection import CollectionError, ImageCollection
from hbird.zeroshot.toy import make_scenes


def _write_images(folder, n=7, seed=0):
    from PIL import Image

    from hbird.io.images import save_image

    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(make_scenes(n, seed=seed)):
        array = (scene.image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
        save_image(folder / f"img_{i:02d}.png", Image.fromarray(array[: 40 + i, :]))
    return folder


def test_build_embeds_every_image_with_clip_preprocessing(tmp_path):
    images = _write_images(tmp_path / "images")
    clip = create_clip("test_clip")
    coll = ImageCollection.build(images, clip, tmp_path / "coll", progress=False, batch_size=3)
    files = sorted(p.name for p in images.iterdir())
    assert coll.files == files and len(coll) == 7
    expected = torch.cat(
        [clip.encode_image(clip.preprocess(load_image(images / f))[None]) for f in files]
    )
    torch.testing.assert_close(coll.embeddings, expected)
    listing = json.loads((tmp_path / "coll" / "files.json").read_text())
    for entry in listing:
        digest = hashlib.sha256((images / entry["path"]).read_bytes()).hexdigest()
        assert entry["sha256"] == digest
    manifest = json.loads((tmp_path / "coll" / "manifest.json").read_text())
    assert manifest["encoder"]["name"] == "test_clip"
    assert manifest["config"]["preprocess"]["image_size"] == 32
    again = ImageCollection.load(tmp_path / "coll", clip=clip)
    torch.testing.assert_close(again.embeddings, coll.embeddings)


def test_retrieve_is_the_top_k_by_inner_product(tmp_path):
    images = _write_images(tmp_path / "images")
    clip = create_clip("test_clip")
    coll = ImageCollection.build(images, clip, tmp_path / "coll", progress=False)
    text = clip.encode_text(["a photo of a red thing."])[0]
    expected = torch.argsort(coll.embeddings @ text, descending=True)[:4]
    assert coll.retrieve(text, 4).tolist() == expected.tolist()
    with pytest.raises(CollectionError, match="holds only 7"):
        coll.retrieve(text, 8, what="class 'road'")


def test_empty_collection_and_another_clip_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CollectionError, match="empty"):
        ImageCollection.build(tmp_path / "empty", "test_clip", tmp_path / "coll", progress=False)
    assert not (tmp_path / "coll").exists()
    images = _write_images(tmp_path / "images", n=2)
    ImageCollection.build(images, "test_clip", tmp_path / "coll", progress=False)
    with pytest.raises(CollectionError, match="built with CLIP test_clip"):
        ImageCollection.load(tmp_path / "coll", clip=create_clip("test_clip", seed=1))
    with pytest.raises(CollectionError, match="not a usable image collection"):
        ImageCollection.load(tmp_path / "images")


def test_interrupted_build_resumes_from_finished_shards(tmp_path):
    images = _write_images(tmp_path / "images", n=7)
    clip = create_clip("test_clip")
    calls = []

    def failing(path):
        if len(calls) == 5:
            raise KeyboardInterrupt
        calls.append(path.name)
        return load_image(path)

    out = tmp_path / "coll"
    with pytest.raises(KeyboardInterrupt):
        ImageCollection.build(
            images, clip, out, batch_size=2, shard_size=2, load=failing, progress=False
        )
    assert not out.exists() and (tmp_path / "coll.partial").is_dir()
    resumed = []

    def counting(path):
        resumed.append(path.name)
        return load_image(path)

    coll = ImageCollection.build(
        images, clip, out, batch_size=2, shard_size=2, load=counting, progress=False
    )
    assert resumed == ["img_04.png", "img_05.png", "img_06.png"]  # 2 batches of 2 were done
    clean = ImageCollection.build(images, clip, tmp_path / "clean", progress=False)
    torch.testing.assert_close(coll.embeddings, clean.embeddings)


def test_a_list_of_files_is_a_collection_rooted_at_their_common_folder(tmp_path):
    images = _write_images(tmp_path / "images", n=3)
    files = sorted(images.iterdir())[1:]
    coll = ImageCollection.build(files, "test_clip", tmp_path / "coll", progress=False)
    assert coll.root == images.resolve() and coll.files == ["img_01.png", "img_02.png"]
    torch.testing.assert_close(coll.load_image(1), load_image(files[1]))


def test_archive_picture_boxes_the_seed_patch(tmp_path):
    """viz/archive: a seed at flat index 5 of a 4×4 grid is patch (row 1, col 1); drawn at
    128 px (32 px per patch) its yellow frame runs just outside pixels 32..63."""
    from hbird.viz.archive import save_archive_picture
    from hbird.viz.correspondence import NEIGHBOUR_BOX

    crops = [torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.5)]
    file = save_archive_picture(
        tmp_path / "a.png", crops, [[5], [0]], (4, 4), scores=torch.rand(2, 4, 4)
    )
    picture = np.asarray(Image.open(file))
    assert picture.shape[0] > 2 * 128  # images, then the score maps under them
    top = picture.shape[0] - 128 - 4 - 128  # the title row's height
    frame = picture[top + 32 - 3 : top + 64 + 3, 32 - 3 : 64 + 3]
    assert (frame == np.array(NEIGHBOUR_BOX, dtype=np.uint8)).all(-1).any()
    assert not (picture[top + 40 : top + 56, 40:56] == np.array(NEIGHBOUR_BOX)).all(-1).any()
