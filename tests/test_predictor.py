"""InContextPredictor end to end on seeded synthetic scenes with the random test_vit."""

import numpy as np
import pytest
import torch
from PIL import Image

from hbird import InContextPredictor, LabelSpec
from hbird.data.pairs import Pairs
from hbird.errors import BankError, InputError
from hbird.memory.bank import MemoryBank
from hbird.metrics import ConfusionMatrix, DepthMetrics
from oracles import eq1_weights


def predictor(**kw):
    defaults = dict(
        encoder="test_vit",
        layers=0,
        image_size=64,
        k=10,
        temperature=0.05,
        index="exact",
        progress=False,
    )
    return InContextPredictor(**{**defaults, **kw})


def miou(preds, queries):
    cm = ConfusionMatrix(4, ignore_index=255)
    for p, s in zip(preds, queries):
        cm.update(p, s.mask)
    return cm.compute().miou


@pytest.fixture(scope="module")
def fitted(scenes):
    prompt, _ = scenes
    return predictor().fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=4)


def test_segmentation_far_above_chance_and_collapses_with_shuffled_labels(scenes, fitted):
    prompt, queries = scenes
    good = miou(fitted.predict([s.image for s in queries]), queries)
    shifted = [s.mask for s in prompt[1:]] + [prompt[0].mask]  # each image gets another's mask
    shuffled = predictor().fit([s.image for s in prompt], shifted, num_classes=4)
    bad = miou(shuffled.predict([s.image for s in queries]), queries)
    # chance level: predicting the majority class everywhere scores ~1/4 of a perfect mIoU
    assert good > 0.7, good
    assert bad < 0.35, bad


def test_depth_beats_the_prompt_mean(scenes):
    prompt, queries = scenes
    spec = LabelSpec(task="depth", min_value=1e-3, max_value=10.0)
    p = predictor().fit([s.image for s in prompt], [s.depth for s in prompt], label_spec=spec)
    preds = p.predict([s.image for s in queries])
    mean = float(torch.cat([s.depth.flatten() for s in prompt]).mean())
    model, base = DepthMetrics(reduction="pixel"), DepthMetrics(reduction="pixel")
    for pred, s in zip(preds, queries):
        assert pred.shape == s.depth.shape and pred.dtype == torch.float32
        model.update(pred, s.depth)
        base.update(torch.full_like(s.depth, mean), s.depth)
    assert model.compute().rmse < 0.75 * base.compute().rmse


def test_output_at_each_querys_own_size(fitted, scenes):
    _, queries = scenes
    batch = torch.stack([s.image for s in queries[:3]])
    out = fitted.predict(batch)
    assert out.shape == (3, 64, 80) and out.dtype == torch.int64
    odd = torch.rand(3, 37, 53)
    masks = fitted.predict([queries[0].image, odd])
    assert [tuple(m.shape) for m in masks] == [(64, 80), (37, 53)]
    dense = fitted.predict_dense([odd])[0]
    assert dense.confidence.shape == (37, 53) and dense.patch_labels.shape[-1] == 4
    assert torch.all((dense.confidence > 0) & (dense.confidence <= 1 + 1e-6))


def test_save_load_round_trip_and_encoder_check(tmp_path, fitted, scenes):
    _, queries = scenes
    path = fitted.save(tmp_path / "bank")
    loaded = InContextPredictor.load(path, progress=False)
    images = [s.image for s in queries[:2]]
    for a, b in zip(fitted.predict(images), loaded.predict(images)):
        assert torch.equal(a, b)
    assert loaded.k == 10 and loaded.layers == 0
    with pytest.raises(BankError, match="test_vit_p16|feature|built with encoder"):
        InContextPredictor.load(path, encoder="test_vit_p16", progress=False)


def test_add_equals_fitting_the_whole_prompt(scenes):
    prompt, queries = scenes
    images, masks = [s.image for s in prompt], [s.mask for s in prompt]
    grown = predictor().fit(images[:12], masks[:12], num_classes=4).add(images[12:], masks[12:])
    whole = predictor().fit(images, masks, num_classes=4)
    assert torch.equal(grown.bank_.keys, whole.bank_.keys)
    assert grown.bank_.num_images == 20
    q = [s.image for s in queries]
    assert all(torch.equal(a, b) for a, b in zip(grown.predict(q), whole.predict(q)))


def test_memory_budget_and_augmentation_epochs(scenes):
    prompt, _ = scenes
    p = predictor(memory_size=200, aug_epochs=2).fit(
        [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
    )
    assert p.bank_.config["budget_per_image"] == 200 // (20 * 2)
    assert len(p.bank_) == 200  # 5 per image and epoch, all scenes fully labelled
    again = predictor(memory_size=200, aug_epochs=2).fit(
        [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
    )
    assert torch.equal(p.bank_.keys, again.bank_.keys)  # seeded


class FlakyPairs:
    """A prompt source that dies at one image the first time (a killed build)."""

    def __init__(self, scenes, die_at):
        self.scenes, self.die_at = scenes, die_at

    def __len__(self):
        return len(self.scenes)

    def load(self, i):
        if i == self.die_at:
            self.die_at = None
            raise KeyboardInterrupt
        return self.scenes[i].image, self.scenes[i].mask, f"mask {i}"


def test_bank_build_resumes_after_interruption(tmp_path, scenes):
    prompt, _ = scenes
    spec = LabelSpec(num_classes=4)
    flaky: Pairs = FlakyPairs(prompt, die_at=13)
    with pytest.raises(KeyboardInterrupt):
        predictor(batch_size=4).build_bank(flaky, spec, tmp_path / "bank", shard_size=100)
    assert not (tmp_path / "bank").exists() and (tmp_path / "bank.partial").exists()
    path = predictor(batch_size=4).build_bank(flaky, spec, tmp_path / "bank", shard_size=100)
    resumed = MemoryBank.load(path)
    straight = predictor(batch_size=4).build_bank(
        FlakyPairs(prompt, None), spec, tmp_path / "b2", shard_size=100
    )
    assert torch.equal(resumed.keys, MemoryBank.load(straight).keys) and resumed.num_images == 20


# -- bad input --------------------------------------------------------------------------
def test_missing_and_unreadable_images_name_the_file(tmp_path, scenes):
    prompt, _ = scenes
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(InputError, match="missing.png.*does not exist"):
        predictor().fit([tmp_path / "missing.png"], [prompt[0].mask], num_classes=4)
    with pytest.raises(InputError, match="broken.png.*could not be read"):
        predictor().fit([broken], [prompt[0].mask], num_classes=4)


def test_mask_size_mismatch_and_bad_values(tmp_path, scenes):
    prompt, _ = scenes
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(InputError, match="small.png is 12x10.*80x64"):
        predictor().fit([prompt[0].image], [tmp_path / "small.png"], num_classes=4)
    bad = prompt[0].mask.clone()
    bad[0, 0] = 9
    Image.fromarray(bad.numpy().astype(np.uint8)).save(tmp_path / "bad.png")
    with pytest.raises(InputError, match=r"bad.png.*\[9\]"):
        predictor().fit([prompt[0].image], [tmp_path / "bad.png"], num_classes=4)


def test_empty_prompt_and_nothing_labelled(scenes):
    prompt, _ = scenes
    with pytest.raises(InputError, match="empty"):
        predictor().fit([], [], num_classes=4)
    with pytest.raises(InputError, match="2 images but 1 labels"):
        predictor().fit([prompt[0].image, prompt[1].image], [prompt[0].mask], num_classes=4)
    with pytest.raises(InputError, match="no valid target"):
        predictor().fit([prompt[0].image], [torch.zeros(64, 80)], task="depth")
    with pytest.raises(InputError, match="no labelled pixel"):
        predictor().fit([prompt[0].image], [torch.full((64, 80), 255)], num_classes=4)


def test_rgba_gray_16bit_and_exif_images_are_handled(tmp_path, fitted):
    rgb = (np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "gray.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif)
    out = fitted.predict(
        [tmp_path / n for n in ("rgba.png", "gray.png", "deep.png", "rotated.jpg")]
    )
    assert [tuple(o.shape) for o in out] == [(40, 56), (40, 56), (40, 56), (56, 40)]


def test_dense_fungi_features_fit_predict_save_load(tmp_path, scenes):
    prompt, queries = scenes
    images, masks = [s.image for s in prompt[:8]], [s.mask for s in prompt[:8]]
    p = predictor(
        layers=None, features="fungi", feature_options={"support_size": 300}, batch_size=4
    )
    p.fit(images, masks, num_classes=4)
    assert (
        p.bank_.feature_dim == 64 and len(p.extractor_.state()["fungi_support"]) == 300
    )  # [patch, gradient] of width 32 each
    q = [s.image for s in queries[:2]]
    first = p.predict(q)
    assert miou(first, queries[:2]) > 0.4
    loaded = InContextPredictor.load(p.save(tmp_path / "bank"), progress=False)
    assert torch.equal(
        loaded.extractor_.state()["fungi_support"], p.extractor_.state()["fungi_support"]
    )
    assert all(torch.equal(a, b) for a, b in zip(first, loaded.predict(q)))
    with pytest.raises(ValueError, match="leave layers unset"):
        predictor(layers=0, features="fungi").fit(images, masks, num_classes=4)


@pytest.mark.parametrize("kind", ["hnsw", "ivfpq"])
def test_saved_bank_keeps_its_approximate_index(tmp_path, scenes, monkeypatch, kind):
    pytest.importorskip("faiss")
    from hbird.index import INDEXES

    prompt, queries = scenes
    fitted_approx = predictor(index=kind).fit(
        [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
    )
    path = fitted_approx.save(tmp_path / "bank")
    assert len(list((path / "indexes").iterdir())) == 1

    def no_add(self, x):
        raise AssertionError("the saved index was rebuilt")

    with monkeypatch.context() as patch:  # ivfpq resolves nlist/refine when trained
        patch.setattr(INDEXES.get(kind), "_add", no_add)
        loaded = InContextPredictor.load(path, progress=False)
    assert not loaded.bank_.keys_in_memory  # a cached exact-scoring index: keys never read
    images = [s.image for s in queries[:3]]
    for a, b in zip(fitted_approx.predict(images), loaded.predict(images)):
        assert torch.equal(a, b)
    # other search settings build (and keep) their own index next to the first
    InContextPredictor.load(path, progress=False, index="flat")
    assert len(list((path / "indexes").iterdir())) == 2


def test_autocast_is_close_to_float32_and_saved_with_the_bank(tmp_path, scenes, fitted):
    prompt, queries = scenes
    bf16 = predictor(autocast="bf16").fit(
        [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
    )
    assert not torch.equal(bf16.bank_.keys, fitted.bank_.keys)  # reduced precision really ran
    images = [s.image for s in queries]
    agree = torch.cat(
        [(a == b).flatten() for a, b in zip(bf16.predict(images), fitted.predict(images))]
    )
    assert float(agree.float().mean()) > 0.9
    loaded = InContextPredictor.load(bf16.save(tmp_path / "bank"), progress=False)
    assert loaded.autocast == "bf16"
    assert all(torch.equal(a, b) for a, b in zip(loaded.predict(images), bf16.predict(images)))
    with pytest.raises(ValueError, match="full precision"):
        predictor(autocast="bf16", features="fungi", layers=None).fit(
            [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
        )


@pytest.mark.parametrize("kind", ["exact", "flat", "hnsw", "ivfpq"])
def test_eq1_weights_from_index_scores_equal_recomputed_cosines(scenes, kind):
    """Fast path: indexes with exact scores skip regathering keys; the oracle recomputes
    eq. 1 from the stored keys (tests/oracles.py, written from the paper)."""
    if kind != "exact":
        pytest.importorskip("faiss")

    prompt, queries = scenes
    p = predictor(index=kind, k=10).fit(
        [s.image for s in prompt], [s.mask for s in prompt], num_classes=4
    )
    assert p.index_.exact_scores
    feats = p.extractor_.transform([queries[0].image])[0]
    q = feats.reshape(-1, feats.shape[-1]) * 3.0  # unnormalised queries: cosines, not dots
    weights, values = p.attend(q)
    _, ids = p.index_.search(q, 10)
    oracle = eq1_weights(q, p.bank_.keys[ids], p.temperature)
    torch.testing.assert_close(weights.double(), oracle, rtol=1e-4, atol=1e-5)
    assert torch.equal(values, p.bank_.values[ids])


@pytest.mark.parametrize("kind", ["exact", "hnsw"])
def test_loaded_predictor_keeps_the_banks_keys_on_disk(tmp_path, scenes, fitted, kind):
    """The keys go from the bank's shards into the index and are not kept in memory;
    predictions, save and add still work (keys are read from the folder when needed)."""
    if kind != "exact":
        pytest.importorskip("faiss")
    _, queries = scenes
    path = fitted.save(tmp_path / "bank")
    loaded = InContextPredictor.load(path, progress=False, index=kind)
    assert not loaded.bank_.keys_in_memory  # streamed into the index, not kept
    images = [s.image for s in queries[:3]]
    reference = InContextPredictor.load(path, progress=False, index=kind)
    reference.bank_.read_keys()  # rereads: the reference holds its keys in memory
    assert all(torch.equal(a, b) for a, b in zip(loaded.predict(images), reference.predict(images)))
    again = InContextPredictor.load(loaded.save(tmp_path / "copy"), progress=False, index=kind)
    assert torch.equal(again.bank_.read_keys(), fitted.bank_.keys)
    loaded.add([queries[3].image], [queries[3].mask])
    assert len(loaded.bank_) == len(loaded.bank_.keys) == loaded.index_.ntotal > len(fitted.bank_)


def test_approximate_index_scores_fall_back_to_recomputed_cosines(scenes):
    pytest.importorskip("faiss")
    prompt, queries = scenes
    p = predictor(index="ivfpq", index_params={"refine": "float16"}, key_dtype="float32", k=10)
    p.fit([s.image for s in prompt], [s.mask for s in prompt], num_classes=4)
    assert not p.index_.exact_scores  # float32 keys, float16 re-ranking copy
    feats = p.extractor_.transform([queries[0].image])[0]
    q = feats.reshape(-1, feats.shape[-1])
    weights, values = p.attend(q)
    _, ids = p.index_.search(q, 10)
    # eq. 1 from the stored float32 keys, not from the index's float16 scores
    oracle = eq1_weights(q, p.bank_.keys[ids], p.temperature)
    torch.testing.assert_close(weights.double(), oracle, rtol=1e-5, atol=1e-6)
    assert torch.equal(values, p.bank_.values[ids])


def test_a_batch_is_searched_at_once_giving_the_predictions_of_each_image_alone(
    fitted, scenes, monkeypatch
):
    """The queries of a whole batch go to the index in one search (issue 15); per image,
    the neighbours, weights and predictions are those of searching that image alone."""
    images = [s.image for s in scenes[1][:5]]
    images[2] = torch.nn.functional.interpolate(images[2][None], size=(48, 96))[0]
    assert fitted.search.batch_size >= len(images)  # one batch
    calls, search = [], fitted.index_.search
    monkeypatch.setattr(fitted.index_, "search", lambda q, k: calls.append(len(q)) or search(q, k))
    together = fitted.predict_dense(images)
    assert calls == [4 * 80 + 8 * 16]  # one search: four 8 x 10 grids, one 8 x 16 (48 x 96)
    for image, got in zip(images, together):
        (alone,) = fitted.predict_dense([image])
        assert torch.equal(got.patch_labels, alone.patch_labels)
        assert torch.equal(got.labels, alone.labels)
        assert torch.equal(got.confidence, alone.confidence)
