"""Axial-DeepLab's losses and inference pinned on hand-made tensors (thesis §3.3.2; issue 13 part 3).

Panoptic-DeepLab (Cheng et al. 2020) as the thesis uses it: semantic cross-entropy on the
hardest 20 % of pixels (weight 1), centre heatmap MSE (weight 200, σ = 8 px Gaussians at
the centres of mass), offset L1 (weight 0.01); inference by centres above 0.1 after a
7×7 max-pool NMS, nearest-centre assignment through the offsets, majority-vote classes
and a stuff area limit of 2048 px at 1024×2048.
"""

from __future__ import annotations

import math

import pytest
import torch

from hbird.panoptic.axial_deeplab import (
    AxialDeepLab,
    hard_pixel_cross_entropy,
    heatmap_mse,
    offset_l1,
)
from hbird.panoptic.specialist import SPECIALISTS, PanopticTarget, create_specialist

pytest.importorskip("scipy")


def tiny(num_classes: int = 3, things=(1, 2), **options) -> AxialDeepLab:
    torch.manual_seed(0)
    return create_specialist(
        "panoptic-deeplab",
        num_classes,
        things,
        backbone="test_axial",
        decoder_width=0.25,
        **options,
    )


def softplus(a: float) -> float:
    return math.log1p(math.exp(a))


def test_hard_pixel_cross_entropy_averages_the_hardest_fifth_of_labelled_pixels():
    """Two classes, logits (a, 0) and label 1: the pixel's CE is log(1 + e^a). Of 10
    labelled pixels the hardest 20 % are the two with a = 5 and a = 4; the void pixel,
    the hardest of all if it counted, does not."""
    a = [-2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, -3.0, 0.5, 9.0]
    logits = torch.tensor([a, [0.0] * len(a)]).view(1, 2, 1, len(a))
    labels = torch.ones(1, 1, len(a), dtype=torch.int64)
    labels[0, 0, -1] = 255
    expected = (softplus(5.0) + softplus(4.0)) / 2
    assert float(hard_pixel_cross_entropy(logits, labels, 255)) == pytest.approx(expected, rel=1e-6)
    # top_k = 1: the plain mean over the 10 labelled pixels
    plain = sum(softplus(x) for x in a[:-1]) / 10
    assert float(hard_pixel_cross_entropy(logits, labels, 255, top_k=1.0)) == pytest.approx(plain)
    # all void: zero, with a gradient path
    assert float(hard_pixel_cross_entropy(logits, torch.full_like(labels, 255), 255)) == 0.0


def test_each_image_keeps_its_own_hardest_fifth_and_images_weigh_the_same():
    """deeplab2's per-sample losses: image 1 has 10 labelled pixels (a = 0..9, keeps the
    2 hardest, a = 9 and 8), image 2 has 5 (a = 10..14, keeps its 1 hardest, a = 14);
    the loss is the mean of the two images' means. (Pooled over the batch the top 3 of
    15 would all come from image 2.) Weighted maps follow the same rule: image 1's MSE
    over its 2 weighted pixels, image 2's over 1, averaged; an image without weight
    counts 0."""
    a = torch.tensor([list(range(10)), list(range(10, 20))], dtype=torch.float64)
    logits = torch.stack([a, torch.zeros_like(a)], 1).view(2, 2, 1, 10)
    labels = torch.ones(2, 1, 10, dtype=torch.int64)
    labels[1, 0, 5:] = 255
    expected = ((softplus(9.0) + softplus(8.0)) / 2 + softplus(14.0)) / 2
    got = hard_pixel_cross_entropy(logits, labels, 255)
    assert float(got) == pytest.approx(expected, rel=1e-12)
    pred = torch.tensor([[[1.0, 2.0, 3.0]], [[4.0, 5.0, 6.0]], [[1.0, 1.0, 1.0]]])
    weight = torch.tensor([[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]], [[0.0, 0.0, 0.0]]])
    mse = heatmap_mse(pred, torch.zeros_like(pred), weight)
    assert float(mse) == pytest.approx(((1 + 4) / 2 + 36 + 0) / 3)
    offsets = torch.stack([pred, pred], 1)  # (3, 2, 1, 3): |dy| + |dx| = 2 · pred
    assert float(offset_l1(offsets, torch.zeros_like(offsets), weight > 0)) == pytest.approx(
        2 * ((1 + 2) / 2 + 6 + 0) / 3
    )


def test_heatmap_mse_and_offset_l1_on_hand_values():
    pred = torch.tensor([[[0.5, 0.0], [1.0, 0.2]]])
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.2]]])
    weight = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # the (1, 0) pixel is void
    assert float(heatmap_mse(pred, target, weight)) == pytest.approx((0.25 + 0 + 0) / 3)
    offsets = torch.zeros(1, 2, 2, 2)
    wanted = torch.tensor([[[[3.0, -1.0], [0.0, 0.0]], [[-4.0, 2.0], [7.0, 0.0]]]])
    mask = torch.tensor([[[True, True], [False, False]]])
    # |3| + |-4| and |-1| + |2| over the two masked pixels; the unmasked 7 does not count
    assert float(offset_l1(offsets, wanted, mask)) == pytest.approx((7 + 3) / 2)
    assert float(offset_l1(offsets, wanted, torch.zeros_like(mask))) == 0.0


def test_loss_weights_terms_1_200_and_0_01_on_a_known_instance():
    """One 16×16 image: stuff class 0, a thing square rows/cols 4..7 (centre of mass
    (5.5, 5.5)), the pixel (0, 0) void. All-zero outputs: uniform logits give every
    labelled pixel CE log 2; the centre MSE is the mean of the Gaussian target² over the
    255 non-void pixels; the offsets' L1 is the mean of |5.5 - y| + |5.5 - x| over the
    square, 1 + 1 = 2."""
    model = tiny(num_classes=2, things=(1,))
    semantic = torch.zeros(16, 16, dtype=torch.int64)
    instance = torch.zeros(16, 16, dtype=torch.int64)
    semantic[4:8, 4:8], instance[4:8, 4:8] = 1, 1
    semantic[0, 0] = 255
    outputs = {
        "semantic": torch.zeros(1, 2, 16, 16),
        "centre": torch.zeros(1, 1, 16, 16),
        "offset": torch.zeros(1, 2, 16, 16),
    }
    terms = model.loss(outputs, [PanopticTarget(semantic, instance)])
    gauss2 = [
        math.exp(-((y - 5.5) ** 2 + (x - 5.5) ** 2) / (2 * 8.0**2)) ** 2
        for y in range(16)
        for x in range(16)
        if (y, x) != (0, 0)
    ]
    mse = sum(gauss2) / 255
    assert float(terms["semantic"]) == pytest.approx(math.log(2))
    assert float(terms["centre"]) == pytest.approx(mse, rel=1e-5)
    assert float(terms["offset"]) == pytest.approx(2.0)
    assert float(terms["loss"]) == pytest.approx(math.log(2) + 200 * mse + 0.01 * 2.0, rel=1e-5)


def test_crowd_pixels_carry_no_centre_loss():
    """A thing pixel of instance 0 is a crowd: no centre, weight 0 in the heatmap MSE."""
    model = tiny(num_classes=2, things=(1,))
    semantic = torch.zeros(8, 8, dtype=torch.int64)
    semantic[:, :4] = 1  # crowd of class 1: instance stays 0
    gt = model.targets([PanopticTarget(semantic, torch.zeros_like(semantic))])
    assert gt["centre"].abs().sum() == 0 and not gt["offset_mask"].any()
    assert gt["centre_weight"][0, :, :4].sum() == 0 and gt["centre_weight"][0, :, 4:].sum() == 32


CENTRES = ((15.3, 9.2), (15.3, 21.2))


def hand_outputs(peaks=(1.0, 1.0)) -> dict[str, torch.Tensor]:
    """32×32, classes 0 (stuff), 1 and 2 (things). Two touching class-1 rectangles (rows
    8..23, cols 4..15 and 16..27) whose offsets point at their centres :data:`CENTRES`;
    four pixels of the left one read class 2. The heatmap is a σ = 2 px Gaussian of
    height ``peaks[i]`` at each centre, plus a bump of 0.97 at (16, 10), beside the left
    peak (1 at (15, 9)) in its 7×7 window: NMS suppresses it."""
    logits = torch.zeros(1, 3, 32, 32)
    logits[0, 0] = 1.0
    logits[0, 1, 8:24, 4:28] = 2.0
    logits[0, 2, 8:10, 4:6] = 3.0  # 4 px of class 2 inside the left rectangle
    ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    heat = torch.zeros(32, 32)
    for peak, (cy, cx) in zip(peaks, CENTRES):
        heat = torch.maximum(heat, peak * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 8))
    heat[16, 10] = 0.97 * peaks[0]
    cx = torch.where(xs < 16, CENTRES[0][1], CENTRES[1][1])
    offset = torch.stack([CENTRES[0][0] - ys, cx - xs])[None]
    return {"semantic": logits, "centre": heat[None, None], "offset": offset}


def test_inference_groups_touching_instances_by_their_centres():
    model = tiny().eval()
    (out,) = model.predict(hand_outputs())
    assert out.semantic.shape == (32, 32)
    left, right = (slice(8, 24), slice(4, 16)), (slice(8, 24), slice(16, 28))
    # majority vote: the 4 class-2 pixels join the left instance's class 1
    assert (out.semantic[left] == 1).all() and (out.semantic[right] == 1).all()
    assert (out.instance[left] == 1).all() and (out.instance[right] == 2).all()
    ground = torch.ones(32, 32, dtype=torch.bool)
    ground[8:24, 4:28] = False
    assert (out.semantic[ground] == 0).all() and (out.instance[ground] == 0).all()


def test_centres_under_the_threshold_of_0_1_are_not_centres():
    # the right peak at 0.09: its pixels go to the only centre left, the left one
    (out,) = tiny().eval().predict(hand_outputs(peaks=(1.0, 0.09)))
    assert (out.instance[8:24, 4:28] == 1).all() and (out.semantic[8:24, 4:28] == 1).all()
    # no centre at all: thing pixels of no instance are void
    (out,) = tiny().eval().predict(hand_outputs(peaks=(0.09, 0.09)))
    assert (out.semantic[8:24, 4:28] == 255).all() and (out.instance == 0).all()


def test_stuff_area_limit_is_2048_px_at_cityscapes_scale():
    """A 256×512 image has 1/16 of 1024×2048's pixels: the limit is 128 px. A 10×10 stuff
    segment of class 1 (100 px) becomes void; a 12×12 one of class 2 (144 px) stays."""
    logits = torch.zeros(1, 4, 256, 512)
    logits[0, 0] = 1.0
    logits[0, 1, :10, :10] = 2.0
    logits[0, 2, 100:112, 100:112] = 2.0
    outputs = {
        "semantic": logits,
        "centre": torch.zeros(1, 1, 256, 512),
        "offset": torch.zeros(1, 2, 256, 512),
    }
    (out,) = tiny(num_classes=4, things=(3,)).eval().predict(outputs)
    assert (out.semantic[:10, :10] == 255).all()
    assert (out.semantic[100:112, 100:112] == 2).all()
    assert int((out.semantic == 0).sum()) == 256 * 512 - 100 - 144


def test_predict_at_another_size_scales_the_offsets():
    """Outputs at 32×32 predicted at 64×64: the offsets double with the image, so both
    rectangles still find their (rescaled) centres."""
    outputs = hand_outputs()
    (out,) = tiny().eval().predict(outputs, size=(64, 64))
    assert out.semantic.shape == (64, 64)
    assert set(torch.unique(out.instance[16:48, 8:56]).tolist()) == {1, 2}
    assert (out.instance[20:44, 12:28] == 1).all() and (out.instance[20:44, 36:52] == 2).all()


def test_the_model_is_registered_and_runs_at_its_size_multiple():
    assert "panoptic-deeplab" in SPECIALISTS
    model = tiny()
    assert model.size_multiple == 16 and model.options()["backbone"] == "test_axial"
    outputs = model.eval()(torch.randn(2, 3, 48, 32))
    assert outputs["semantic"].shape == (2, 3, 48, 32)
    assert outputs["centre"].shape == (2, 1, 48, 32) and outputs["offset"].shape == (2, 2, 48, 32)
    maps = model.predict(outputs)
    assert len(maps) == 2 and maps[0].semantic.shape == (48, 32)


def test_a_backbone_without_the_needed_strides_is_refused():
    with pytest.raises(ValueError, match="output stride of 16"):
        create_specialist("panoptic-deeplab", 3, (1,), backbone="axial_resnet_s")
