"""Views of the losses (multi-crop, patch grid, word deletion), PCA and the seeded heads."""

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from hbird.fungi.heads import RandomHead
from hbird.fungi.losses import info_nce
from hbird.fungi.pca import PCA
from hbird.fungi.views import (
    CropBox,
    MultiCrop,
    PatchGrid,
    WordDeletion,
    canvas_side,
    center_square,
    square_images,
)
from hbird.io.seeds import derive_seed


def test_square_images_resizes_short_side_and_centre_crops():
    image = torch.zeros(3, 40, 80)
    image[:, :, 20:60] = 1.0  # a bright centre band, half the width
    out = square_images([image], 32)
    assert out.shape == (1, 3, 32, 32)
    assert float(out.mean()) == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="float"):
        square_images([torch.zeros(3, 8, 8, dtype=torch.uint8)], 8)


def test_shared_multicrop_boxes_follow_the_paper_ranges_and_the_seed():
    crops = MultiCrop(224, 224, 96, seed=0, boxes="shared")
    again = MultiCrop(224, 224, 96, seed=0, boxes="shared")
    other = MultiCrop(224, 224, 96, seed=1, boxes="shared")
    assert len(crops.shared) == 12  # Table 17: 2 global + 10 local crops
    assert crops.shared == again.shared and crops.shared[2:] != other.shared[2:]
    for boxes, (lo, hi) in ((crops.shared[:2], (0.25, 1.0)), (crops.shared[2:], (0.05, 0.25))):
        for b in boxes:
            assert (
                0 <= b.top and b.top + b.height <= 224 and 0 <= b.left and b.left + b.width <= 224
            )
            assert lo - 0.02 <= b.height * b.width / 224**2 <= hi + 0.02


def test_shared_multicrop_views_are_sample_major_and_shared_across_images():
    crops = MultiCrop(32, 32, 16, num_local=3, seed=0, boxes="shared", interpolation="bilinear")
    batch = torch.rand(2, 3, 32, 32)
    global_views, local_views = crops(batch)
    assert global_views.views.shape == (4, 3, 32, 32) and global_views.views_per_sample == 2
    assert local_views.views.shape == (6, 3, 16, 16) and local_views.views_per_sample == 3
    alone = crops(batch[1:])[1].views
    assert torch.equal(alone, local_views.views[3:])
    b = crops.shared[2]  # sample 1's first local crop is its box, resized bilinearly
    expected = TF.resized_crop(batch[1], b.top, b.left, b.height, b.width, [16, 16], antialias=True)
    assert torch.equal(local_views.views[3], expected)


def test_per_image_boxes_depend_on_the_image_and_the_seed_only():
    crops = MultiCrop(32, 32, 16, num_local=3, seed=0)  # default: per image, bicubic
    batch = torch.rand(3, 3, 32, 32)
    batch[2] = batch[0]
    boxes = [crops.boxes_for(image) for image in batch]
    assert boxes[0] != boxes[1] and boxes[0] == boxes[2]  # drawn from the image's pixels
    assert boxes[0] != MultiCrop(32, 32, 16, num_local=3, seed=1).boxes_for(batch[0])
    global_views, local_views = crops(batch)
    b = boxes[1][3]  # sample 1's second local crop, bicubic
    mode = TF.InterpolationMode.BICUBIC
    expected = TF.resized_crop(
        batch[1], b.top, b.left, b.height, b.width, [16, 16], mode, antialias=True
    )
    assert torch.equal(local_views.views[3 + 1], expected)
    assert torch.equal(crops(batch[1:2])[1].views, local_views.views[3:6])


def test_given_crop_boxes_are_cut_for_every_image():
    boxes = [CropBox(0, 0, 32, 32), [4, 8, 16, 12], CropBox(10, 2, 6, 6)]
    crops = MultiCrop(32, 32, 16, num_global=1, num_local=2, boxes=boxes, interpolation="bilinear")
    batch = torch.rand(2, 3, 32, 32)
    global_views, local_views = crops(batch)
    assert torch.equal(global_views.views, batch)  # the whole canvas at its own size
    expected = TF.resize(batch[1:, :, 4:20, 8:20], [16, 16], antialias=True)[0]
    assert torch.equal(local_views.views[2], expected)
    by_function = MultiCrop(32, 32, 16, num_global=1, num_local=2, boxes=lambda image: boxes)
    assert by_function.boxes_for(batch[0])[1] == CropBox(4, 8, 16, 12)
    with pytest.raises(ValueError, match="does not fit"):
        MultiCrop(32, 32, 16, num_global=1, num_local=2, boxes=[[0, 0, 33, 4]] * 3)
    with pytest.raises(ValueError, match="1 global \\+ 2 local"):
        MultiCrop(32, 32, 16, num_global=1, num_local=2, boxes=boxes[:2])


def test_patch_grid_spread_is_seven_by_seven_for_224():
    grid = PatchGrid(224, 112, grid="spread")
    assert grid.num_patches == 49
    assert grid.offsets == [0, 19, 37, 56, 75, 93, 112]
    batch = torch.arange(2 * 3 * 224 * 224, dtype=torch.float32).reshape(2, 3, 224, 224)
    (group,) = grid(batch)
    assert group.views.shape == (98, 3, 112, 112) and group.views_per_sample == 49
    assert torch.equal(group.views[49 + 8], batch[1, :, 19:131, 19:131])  # sample 1, row 1, col 1


def test_patch_grid_unfold_is_fungis_code():
    """FUNGI B.1: 49 patches of 112 with stride 1/6 of the patch: ``int(112 / 6) = 18``,
    offsets 0..108 as ``Tensor.unfold``; each patch resized to 224, bicubic."""
    grid = PatchGrid(224, 112, view_size=224)
    assert grid.offsets == [0, 18, 36, 54, 72, 90, 108] and grid.num_patches == 49
    batch = torch.rand(1, 3, 224, 224)
    unfolded = batch[0].unfold(1, 112, 18).unfold(2, 112, 18)  # (3, 7, 7, 112, 112)
    (group,) = PatchGrid(224, 112)(batch)  # kept at 112
    assert torch.equal(group.views[7 * 2 + 5], unfolded[:, 2, 5])
    (big,) = grid(batch)
    mode = TF.InterpolationMode.BICUBIC
    expected = TF.resize(unfolded[:, 2, 5], [224, 224], mode, antialias=True)
    assert big.views.shape == (49, 3, 224, 224)
    assert torch.allclose(big.views[7 * 2 + 5], expected, atol=1e-6)


def test_canvas_square_resize_and_centre_view():
    image = torch.zeros(3, 40, 80)
    image[:, :, :40] = 1.0  # the left half bright
    canvas = square_images([image], 224, resize="square")
    assert canvas.shape == (1, 3, 256, 256)  # FUNGI's code: Resize((256, 256)), aspect not kept
    assert float(canvas[0, :, :, :120].mean()) == pytest.approx(1.0, abs=1e-3)
    assert float(canvas[0, :, :, 136:].mean()) == pytest.approx(0.0, abs=1e-3)
    view = center_square(canvas, 224)  # then CenterCrop(224)
    assert torch.equal(view, canvas[:, :, 16:240, 16:240])
    assert canvas_side(224, "short-side") == 224 and canvas_side(32, "square") == 37


def test_word_deletion_is_seeded_by_the_text_and_keeps_a_word():
    views = WordDeletion(num_views=50, p=0.5, seed=0)
    text = "the quick brown fox jumps"
    first = views.edit(text)
    assert first == views.edit(text)
    assert all(v and set(v.split()) <= set(text.split()) for v in first)
    assert len(set(first)) > 1
    assert WordDeletion(num_views=3, p=0.0).edit(text) == [text] * 3
    (group,) = views(["a b", text])
    assert group.views[50:] == first and group.views_per_sample == 50


def test_heads_and_seeds_are_deterministic():
    assert derive_seed(0, "head", "kl") == derive_seed(0, "head", "kl")
    assert derive_seed(0, "head", "kl") != derive_seed(1, "head", "kl")
    a, b = RandomHead(8, 4, 0, "x"), RandomHead(8, 4, 0, "x")
    assert torch.equal(a.weight, b.weight) and not torch.equal(
        a.weight, RandomHead(8, 4, 0, "y").weight
    )
    assert float(a.weight.abs().max()) <= 8**-0.5


def test_info_nce_matches_its_definition():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.randn(2, 3, 5, generator=gen, dtype=torch.float64)
    negatives = torch.randn(4, 5, generator=gen, dtype=torch.float64)
    tau = 0.5
    got = info_nce(anchors, negatives, tau)

    def cos(x, y):
        return float(x @ y / (x.norm() * y.norm())) / tau

    for b in range(2):
        total = 0.0
        for a in range(3):
            others = [c for c in range(3) if c != a]
            attract = sum(cos(anchors[b, a], anchors[b, c]) for c in others) / 2
            terms = [cos(anchors[b, a], anchors[b, c]) for c in others]
            terms += [cos(anchors[b, a], n) for n in negatives]
            total += np.log(np.sum(np.exp(terms))) - attract
        assert float(got[b]) == pytest.approx(total / 3, rel=1e-12)


def test_pca_matches_numpy_svd():
    gen = np.random.default_rng(0)
    x = gen.normal(size=(200, 6)) @ gen.normal(size=(6, 6)) + 3.0
    pca = PCA(3).fit(torch.from_numpy(x))
    centred = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    for k in range(3):
        assert abs(float(pca.components_[k].double() @ torch.from_numpy(vt[k]))) == pytest.approx(
            1.0, abs=1e-5
        )
    assert pca.explained_variance_.numpy() == pytest.approx(s[:3] ** 2 / 199, rel=1e-5)
    projected = pca.transform(torch.from_numpy(x)).double().numpy()
    assert np.abs(projected).max(axis=0) == pytest.approx(
        np.abs(centred @ vt[:3].T).max(axis=0), rel=1e-4
    )
    restored = PCA.from_state(pca.state_dict())
    assert torch.equal(restored.transform(torch.from_numpy(x)), pca.transform(torch.from_numpy(x)))
    with pytest.raises(ValueError, match="at least"):
        PCA(10).fit(torch.zeros(5, 20))
