"""InContextPredictor.remove: dropping a prompt image equals never having had it."""

import pytest
import torch

from hbird import InContextPredictor
from hbird.errors import BankError, InputError
from hbird.io.files import save_tensors
from hbird.memory.bank import _sha256

SETTINGS = dict(encoder="test_vit", layers=0, image_size=64, k=10, temperature=0.05)


def predictor(**kw):
    return InContextPredictor(**{**SETTINGS, "index": "exact", "progress": False, **kw})


def same_predictions(a, b, queries):
    q = [s.image for s in queries]
    return all(torch.equal(x, y) for x, y in zip(a.predict(q), b.predict(q)))


def test_removal_equals_a_fresh_fit_without_that_image(scenes):
    """Default settings (every labelled patch, one pass): an image's entries do not depend
    on the other images, so removing image 2 of 6 gives the bank, and the predictions, of
    a predictor fitted on the other five (exact index)."""
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:6]], [s.mask for s in prompt[:6]]
    full = predictor().fit(images, masks, num_classes=4)
    before = full.predict([s.image for s in queries])
    full.remove(2)
    keep = [0, 1, 3, 4, 5]
    fresh = predictor().fit([images[i] for i in keep], [masks[i] for i in keep], num_classes=4)
    assert full.image_ids_ == keep and full.bank_.num_images == 5
    assert torch.equal(full.bank_.keys, fresh.bank_.keys)
    assert torch.equal(full.bank_.values, fresh.bank_.values)
    assert full.index_.ntotal == len(fresh.bank_)
    assert same_predictions(full, fresh, queries)
    after = full.predict([s.image for s in queries])
    assert not all(torch.equal(a, b) for a, b in zip(before, after))  # the removal mattered


def test_removal_with_a_budget_and_augmentation_keeps_the_full_fits_samples(scenes):
    """With a memory budget and two passes an image's entries depend on its position and
    on the prompt size (|M| / (|D|·E), appendix A.1). The oracle: the same six-image fit
    with image 2's mask all ignore (255), which samples every other image identically
    and gives image 2 no entry."""
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:6]], [s.mask for s in prompt[:6]]
    settings = dict(memory_size=240, aug_epochs=2)
    full = predictor(**settings).fit(images, masks, num_classes=4).remove(2)
    blank = [m if i != 2 else torch.full_like(m, 255) for i, m in enumerate(masks)]
    oracle = predictor(**settings).fit(images, blank, num_classes=4)
    assert torch.equal(full.bank_.keys, oracle.bank_.keys)
    assert torch.equal(full.bank_.values, oracle.bank_.values)
    assert same_predictions(full, oracle, queries)


def test_remove_then_add_round_trip(scenes):
    """Removing image 1 and adding it back equals fitting the prompt in the new order; the
    re-added image gets a new id, never a reused one."""
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:4]], [s.mask for s in prompt[:4]]
    p = predictor().fit(images, masks, num_classes=4).remove(1).add([images[1]], [masks[1]])
    order = [0, 2, 3, 1]
    fresh = predictor().fit([images[i] for i in order], [masks[i] for i in order], num_classes=4)
    assert p.image_ids_ == [0, 2, 3, 4] and p.bank_.num_images == 4
    assert torch.equal(p.bank_.keys, fresh.bank_.keys)
    assert same_predictions(p, fresh, queries)
    p.remove(4)  # the new id removes the re-added image only
    assert p.image_ids_ == [0, 2, 3] and len(p.bank_) == len(fresh.bank_) - (
        (fresh.bank_.image_ids == 3).sum()
    )


def test_unknown_ids_and_an_emptied_memory_are_refused_clearly(scenes):
    prompt, _ = scenes
    p = predictor().fit([s.image for s in prompt[:2]], [s.mask for s in prompt[:2]], num_classes=4)
    with pytest.raises(InputError, match=r"image id\(s\) \[7\] are not in this predictor's prompt"):
        p.remove(7)
    with pytest.raises(InputError, match="would leave the memory empty"):
        p.remove([0, 1])
    assert p.image_ids_ == [0, 1] and p.bank_.num_images == 2  # nothing changed


def test_removal_survives_save_and_load(tmp_path, scenes):
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:4]], [s.mask for s in prompt[:4]]
    p = predictor().fit(images, masks, num_classes=4).remove(0)
    loaded = InContextPredictor.load(p.save(tmp_path / "bank"), progress=False)
    assert loaded.image_ids_ == [1, 2, 3] and loaded.bank_.num_images == 3
    assert same_predictions(loaded, p, queries)
    loaded.remove(3)
    fresh = predictor().fit(images[1:3], masks[1:3], num_classes=4)
    assert same_predictions(loaded, fresh, queries)


def test_a_bank_saved_without_image_ids_loads_but_cannot_remove(tmp_path, scenes):
    """Banks of older hbirds have shards with keys and values only."""
    import json

    from safetensors.torch import load_file

    prompt, queries = scenes
    p = predictor().fit([s.image for s in prompt[:3]], [s.mask for s in prompt[:3]], num_classes=4)
    path = p.save(tmp_path / "bank")
    manifest = json.loads((path / "manifest.json").read_text())
    for shard in manifest["shards"]:  # rewrite each shard as an older hbird wrote it
        tensors = load_file(str(path / shard["file"]))
        save_tensors(path / shard["file"], {n: tensors[n] for n in ("keys", "values")})
        shard["sha256"] = _sha256(path / shard["file"])
    (path / "manifest.json").write_text(json.dumps(manifest))
    old = InContextPredictor.load(path, progress=False)
    assert old.image_ids_ is None and bool((old.bank_.image_ids == -1).all())
    assert same_predictions(old, p, queries)
    with pytest.raises(BankError, match="saved by an older hbird"):
        old.remove(0)
