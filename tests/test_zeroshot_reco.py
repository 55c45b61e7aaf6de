"""ReCo end to end in the toy world (issue 11, Acceptance): retrieval and co-segmentation
can really succeed or fail there.

The world (:mod:`hbird.zeroshot.toy`): every scene shares a textured gray ground; each
collection scene holds one object of one of four colour/texture classes (20 scenes per
class), so an archive of k = 24 images always holds some images without the class.
Plain co-segmentation then seeds on the shared ground; language guidance and context
elimination (context: "gray") move the seeds onto the class. The toy CLIP's dense
embedding has 8-pixel cells (a 6×6 grid), too coarse to draw the small test objects' boundaries.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hbird.data.synthetic import write_scene_folder
from hbird.errors import InputError
from hbird.metrics.segmentation import ConfusionMatrix
from hbird.zeroshot import toy
from hbird.zeroshot.collection import ImageCollection
from hbird.zeroshot.reco import ReCo, dense_clip_scores
from hbird.zeroshot.templates import text_embeddings

K = 24
PLAIN = {"context_elimination": False, "language_guidance": False, "dense_inference": False}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    scenes = toy.make_scenes(80, seed=0)
    write_scene_folder(root / "scenes", scenes, class_names=toy.CLASSES, with_depth=False)
    clip = toy.ToyClip()
    coll = ImageCollection.build(root / "scenes" / "images", clip, root / "coll", progress=False)
    tests = [
        toy.make_scene(1, i, objects=[1 + i % 4, 1 + (i + 1) % 4], sizes=(8, 18)) for i in range(8)
    ]
    return {"root": root, "scenes": scenes, "clip": clip, "coll": coll, "tests": tests}


def _reco(world, **settings):
    settings = {"k": K, "image_size": 48, "contexts": ("gray",), **settings}
    return ReCo(
        collection=world["coll"],
        encoder=toy.ToyEncoder(),
        dense_clip=world["clip"],
        progress=False,
        **settings,
    )


def _miou(world, predict) -> float:
    cm = ConfusionMatrix(len(toy.CLASSES), class_names=toy.CLASSES)
    for scene in world["tests"]:
        cm.update(predict(scene.image), scene.mask)
    return cm.compute().miou


def test_retrieval_precision_at_20(world):
    """Step 3: the top 20 images for each object class's t_c hold that class."""
    clip, coll, scenes = world["clip"], world["coll"], world["scenes"]
    for c, name in enumerate(toy.CLASSES[1:], start=1):
        ids = coll.retrieve(text_embeddings(clip, [name])[0], 20)
        precision = sum(bool((scenes[int(i)].mask == c).any()) for i in ids) / 20
        assert precision >= 0.95, (name, precision)


@pytest.fixture(scope="module")
def full(world):
    return _reco(world).build(list(toy.CLASSES))


def test_full_reco_beats_plain_cosegmentation_denseclip_alone_and_a_random_reference(world, full):
    full_miou = _miou(world, lambda im: full.predict([im])[0])
    plain = _reco(world, **PLAIN).build(list(toy.CLASSES))
    plain_miou = _miou(world, lambda im: plain.predict([im])[0])
    text = text_embeddings(world["clip"], list(toy.CLASSES))
    dense_miou = _miou(
        world, lambda im: dense_clip_scores(world["clip"], text, im, im.shape[-2:]).argmax(0)
    )
    rand = plain  # the same model with random unit references
    seeds_on_ground = _seeds_on_class(world, plain, "red", 0)
    seeds_on_red = _seeds_on_class(world, full, "red", 1)
    g = torch.Generator().manual_seed(0)
    rand.references = F.normalize(torch.randn(rand.references.shape, generator=g), dim=-1)
    random_miou = _miou(world, lambda im: rand.predict([im])[0])
    assert full_miou >= 0.75
    assert plain_miou <= 0.3, "plain co-segmentation should seed on the shared ground"
    assert full_miou - dense_miou >= 0.15
    assert full_miou - random_miou >= 0.5
    assert seeds_on_ground >= 0.9 and seeds_on_red >= 0.95, (seeds_on_ground, seeds_on_red)


def _seeds_on_class(world, reco, name, class_id) -> float:
    """The fraction of seeds on ``class_id`` among the archive images of ``name`` that
    contain it (patch-4 grid of the 48-pixel scenes)."""
    archive, scenes, hits = reco.archives[name], world["scenes"], []
    target = toy.CLASSES.index(name)
    for i, seed in zip(archive.ids.tolist(), archive.seeds[:, 0].tolist()):
        mask = scenes[i].mask[2::4, 2::4].reshape(-1)
        if (mask == target).any():
            hits.append(int(mask[seed]) == class_id)
    return sum(hits) / len(hits)


def test_save_load_reproduces_predictions_bit_for_bit(world, full, tmp_path):
    full.save(tmp_path / "refs")
    again = ReCo.load(tmp_path / "refs", encoder=toy.ToyEncoder(), collection=world["coll"])
    for scene in world["tests"][:3]:
        assert torch.equal(full.scores(scene.image), again.scores(scene.image))
        assert torch.equal(full.predict([scene.image])[0], again.predict([scene.image])[0])
    assert again.classes == full.classes and again.settings == full.settings
    for name in full.prompts:
        assert torch.equal(again.archives[name].seeds, full.archives[name].seeds)


def test_load_refuses_any_other_model_or_collection(world, full, tmp_path):
    full.save(tmp_path / "refs")
    with pytest.raises(InputError, match="encoder"):
        ReCo.load(tmp_path / "refs", encoder=toy.ToyEncoder(texture_weight=0.3))
    with pytest.raises(InputError, match="dense_clip"):
        ReCo.load(tmp_path / "refs", encoder=toy.ToyEncoder(), dense_clip=toy.ToyClip(cell=16))
    other = ImageCollection.build(
        world["root"] / "scenes" / "images",
        toy.ToyClip(cell=16),
        tmp_path / "other",
        progress=False,
    )
    with pytest.raises(InputError, match="collection"):
        ReCo.load(tmp_path / "refs", encoder=toy.ToyEncoder(), collection=other)
    with pytest.raises(InputError, match="cannot change on load"):
        ReCo.load(tmp_path / "refs", encoder=toy.ToyEncoder(), k=3)
    with pytest.raises(InputError, match="already exists"):
        full.save(tmp_path / "refs")


def test_contexts_are_order_free_and_a_context_class_reuses_its_reference(world):
    """Step 6: context references come from un-eliminated archives, so swapping the
    context order changes nothing; a class that is a context keeps that reference."""
    a = _reco(world, contexts=("gray", "blue"), dense_inference=False).build(["green", "blue"])
    b = _reco(world, contexts=("blue", "gray"), dense_inference=False).build(["green", "blue"])
    torch.testing.assert_close(a.references, b.references, rtol=0, atol=1e-6)
    lang_only = _reco(world, context_elimination=False).build(["blue"])
    torch.testing.assert_close(a.references[1], lang_only.references[0], rtol=0, atol=1e-6)


def test_renames_prompt_the_class_with_its_new_name(world, full):
    renamed = _reco(world).build(["grey", "red"], renames={"grey": "gray"})
    assert renamed.prompts == ["gray", "red"]
    torch.testing.assert_close(renamed.references[0], full.references[0])
    with pytest.raises(InputError, match="not in the list"):
        _reco(world).build(["red"], renames={"sky": "blue sky"})


def test_settings_errors(world):
    with pytest.raises(InputError, match="no setting"):
        _reco(world, kk=3)
    with pytest.raises(InputError, match="multiple of the encoder's patch"):
        _reco(world, image_size=66)
    with pytest.raises(InputError, match="holds only 80"):
        _reco(world, k=81).build(["red"])


@pytest.mark.slow
def test_component_table(world, capsys):
    """The paper's ablation shape (plain < +language < both) and the table for the notes."""
    rows = {
        "plain": PLAIN,
        "+context elimination": {"language_guidance": False, "dense_inference": False},
        "+language guidance": {"context_elimination": False, "dense_inference": False},
        "both": {"dense_inference": False},
        "both + dense inference": {},
        "both + dense inference, official grid": {"official_grid": True},
    }
    table = {}
    for name, settings in rows.items():
        reco = _reco(world, **settings).build(list(toy.CLASSES))
        table[name] = _miou(world, lambda im, r=reco: r.predict([im])[0])
    text = text_embeddings(world["clip"], list(toy.CLASSES))
    table["DenseCLIP alone"] = _miou(
        world, lambda im: dense_clip_scores(world["clip"], text, im, im.shape[-2:]).argmax(0)
    )
    g = torch.Generator().manual_seed(0)
    reco.references = F.normalize(torch.randn(reco.references.shape, generator=g), dim=-1)
    table["random reference (+ dense inference)"] = _miou(world, lambda im: reco.predict([im])[0])
    with capsys.disabled():
        print("\n| components | toy mIoU |\n|---|---|")
        for name, value in table.items():
            print(f"| {name} | {value:.3f} |")
    assert table["plain"] < table["+language guidance"] < table["both"]
    assert table["plain"] < table["+context elimination"] <= table["both"] + 0.02
    assert table["both"] > table["DenseCLIP alone"] + 0.15
