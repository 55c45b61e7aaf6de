"""MaX-DeepLab (thesis §4.3): the mask head, the inference rules of §4.4 on hand-made
outputs, slot permutations, the loss weights, and the registry entry."""

from __future__ import annotations

import math

import pytest
import torch

from hbird.errors import InputError
from hbird.panoptic.max_deeplab import PRESETS, MaXDeepLab, _cell_centres
from hbird.panoptic.specialist import SPECIALISTS, PanopticTarget, create_specialist

pytest.importorskip("scipy")


def tiny(num_classes: int = 4, things=(1, 2, 3), **options) -> MaXDeepLab:
    torch.manual_seed(0)
    return MaXDeepLab(num_classes, things, preset="tiny", **options)


def class_logits(rows: list[tuple[int, float]], num_classes: int) -> torch.Tensor:
    """One row per slot: class ``c`` (``num_classes`` = ∅) with probability ``p``, the
    rest spread evenly over the other ``num_classes`` entries."""
    out = torch.empty(len(rows), num_classes + 1)
    for i, (c, p) in enumerate(rows):
        probs = torch.full((num_classes + 1,), (1 - p) / num_classes)
        probs[c] = p
        out[i] = probs.log()
    return out


def owned(slots: int, height: int, width: int, owners: dict[int, tuple]) -> torch.Tensor:
    """Mask logits ``(N, H, W)``: every pixel of region ``owners[slot]`` has probability
    ~1 on ``slot`` (logit 30 against 0)."""
    logits = torch.zeros(slots, height, width)
    for slot, region in owners.items():
        logits[(slot, *region)] = 30.0
    return logits


def test_inference_rules_on_hand_made_outputs() -> None:
    """8 x 8, classes 0 (stuff), 1, 2 (things), ∅ = 3; thesis §4.4: class confidence < 0.7
    or ∅ → void mask; argmax mask per pixel; mask probability < 0.4 → void pixel."""
    model = tiny(3, (1, 2))
    n = 6
    logits = owned(
        n,
        8,
        8,
        {
            0: (slice(0, 4), slice(None)),  # stuff 0, kept
            5: (slice(4, 6), slice(0, 2)),  # thing 1, kept, first in raster order
            1: (slice(6, 8), slice(0, 2)),  # thing 1, kept, second
            2: (slice(4, 8), slice(2, 4)),  # thing 1 at confidence 0.65: void
            3: (slice(4, 8), slice(4, 6)),  # ∅: void
        },
    )
    # column 6: slot 4 at probability 0.45 (kept); column 7: 0.35 (void pixel)
    for col, p in ((6, 0.45), (7, 0.35)):
        column = torch.full((n,), math.log((1 - p) / (n - 1)))
        column[4] = math.log(p)
        logits[:, 4:8, col] = column[:, None]
    classes = class_logits([(0, 0.9), (1, 0.95), (1, 0.65), (3, 0.9), (2, 0.8), (1, 0.9)], 3)
    (pan,) = model.predict({"mask_logits": logits[None], "class_logits": classes[None]}, (8, 8))
    v = 255
    semantic = torch.tensor([[0] * 8] * 4 + [[1, 1, v, v, v, v, 2, v]] * 4)
    instance = torch.tensor(
        [[0] * 8] * 4 + [[1, 1, 0, 0, 0, 0, 1, 0]] * 2 + [[2, 2, 0, 0, 0, 0, 1, 0]] * 2
    )
    assert torch.equal(pan.semantic, semantic)
    assert torch.equal(pan.instance, instance)


@pytest.mark.parametrize(
    ("thing", "area", "kept"),
    [(False, 40, False), (False, 41, True), (True, 2, False), (True, 3, True)],
)
def test_area_limits_scale_with_the_image(thing: bool, area: int, kept: bool) -> None:
    """Limits 4096 (stuff) and 256 (things) px at COCO's 641 x 641 inference size
    (thesis §4.4), so at 64 x 64: 4096·64²/641² = 40.83 px and 256·64²/641² = 2.55 px."""
    model = tiny(3, (2,))  # classes 0, 1 stuff; 2 thing
    region = (torch.arange(64 * 64) < area).view(64, 64)
    logits = torch.zeros(2, 64, 64)
    logits[0], logits[1] = 30.0 * ~region, 30.0 * region
    classes = class_logits([(0, 0.9), (2 if thing else 1, 0.9)], 3)
    (pan,) = model.predict({"mask_logits": logits[None], "class_logits": classes[None]}, (64, 64))
    want = (2 if thing else 1) if kept else 255
    assert set(pan.semantic[region].tolist()) == {want}
    assert set(pan.semantic[~region].tolist()) == {0}


def test_prediction_ignores_the_order_of_slots() -> None:
    """Random outputs: permuting the N slots (masks and classes together) gives the same
    panoptic map, instance numbers included."""
    model = tiny(4, (1, 2, 3))
    torch.manual_seed(5)
    outputs = {
        "mask_logits": 4 * torch.randn(2, 8, 16, 16),
        "class_logits": 5 * torch.randn(2, 8, 5),
    }
    perm = torch.tensor([6, 2, 7, 0, 3, 5, 1, 4])
    permuted = {k: v[:, perm] for k, v in outputs.items()}
    for a, b in zip(model.predict(outputs), model.predict(permuted)):
        assert a.semantic.shape == (64, 64)
        assert torch.equal(a.semantic, b.semantic) and torch.equal(a.instance, b.instance)
    assert int(sum(p.instance.max() for p in model.predict(outputs))) >= 2  # not trivial


def test_model_is_equivariant_to_memory_slots() -> None:
    """No position on the memory: permuting the learned memory's slots permutes the
    mask and class outputs and leaves the panoptic prediction unchanged."""
    model = tiny().eval()
    images = torch.randn(2, 3, 32, 32)
    perm = torch.tensor([3, 1, 7, 0, 6, 2, 5, 4])
    with torch.no_grad():
        before = model(images)
        model.memory.copy_(model.memory[perm].clone())
        after = model(images)
    for key in ("mask_logits", "class_logits"):
        torch.testing.assert_close(after[key], before[key][:, perm], atol=1e-4, rtol=1e-4)
    for a, b in zip(model.predict(before), model.predict(after)):
        assert torch.equal(a.semantic, b.semantic) and torch.equal(a.instance, b.instance)


def test_mask_head_is_batch_normalised_f_dot_g() -> None:
    """Eq. 4.15 in eval mode: mask logit (n, p) = BN(f_n · g_p), f = BN(2FC(memory))
    captured at its norm, g = the returned mask features; masks = softmax over slots."""
    model = tiny().eval()
    seen = {}
    model.memory_norm.register_forward_hook(lambda m, i, o: seen.update(f=o))  # (B, N, D)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32))
    f, g = seen["f"][0], out["mask_features"][0]  # (N, D), (D, 8, 8)
    bn = model.mask_norm
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    want = (torch.einsum("nd,dhw->nhw", f, g) - bn.running_mean) * scale + bn.bias
    assert out["mask_logits"].shape == (1, 8, 8, 8) and out["class_logits"].shape == (1, 8, 5)
    torch.testing.assert_close(out["mask_logits"][0], want, atol=1e-4, rtol=1e-4)


def test_targets_are_sampled_at_cell_centres() -> None:
    label = torch.arange(64).view(8, 8)
    assert _cell_centres(label, (2, 2)).tolist() == [[18, 22], [50, 54]]


def test_loss_weights_and_gradients() -> None:
    """loss = 3 L_PQ + 1 InstDis + 0.3 mask-ID + 1 semantic (thesis §4.4); every part of
    the model gets a gradient."""
    model = tiny().train()
    torch.manual_seed(1)
    images = torch.randn(2, 3, 32, 32)
    semantic = torch.zeros(2, 32, 32, dtype=torch.int64)
    instance = torch.zeros_like(semantic)
    semantic[:, 4:16, 4:16], instance[:, 4:16, 4:16] = 1, 1
    semantic[:, 16:28, 8:20], instance[:, 16:28, 8:20] = 1, 2  # touches instance 1
    semantic[1, 0:2] = 255
    targets = [PanopticTarget(s, i) for s, i in zip(semantic, instance)]
    losses = model.loss(model(images), targets)
    want = (
        3 * losses["pq"]
        + losses["instance_discrimination"]
        + 0.3 * losses["mask_id"]
        + losses["semantic"]
    )
    torch.testing.assert_close(losses["loss"], want)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses["loss"].backward()
    for part in (
        model.backbone,
        model.blocks,
        model.decoder,
        model.class_head,
        model.semantic_head,
    ):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert model.memory.grad.abs().sum() > 0


def test_registered_and_rebuilt_from_options() -> None:
    assert "max-deeplab" in SPECIALISTS
    model = create_specialist("max-deeplab", 4, (1, 2, 3), preset="tiny", slots=5)
    assert model.config.slots == 5 and model.size_multiple == 16
    again = create_specialist("max-deeplab", 4, (1, 2, 3), **model.options())
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    with pytest.raises(InputError, match="preset"):
        MaXDeepLab(4, (1,), preset="huge")
    with pytest.raises(
        InputError, match="does not take backbone; it takes preset, backbone_depths"
    ):
        MaXDeepLab(4, (1,), backbone="test_axial")


def test_paper_preset_settings() -> None:
    """The default preset carries the thesis' N = 128, D = 128 and 8 heads (§4.4, §C.6)."""
    cfg = PRESETS["s"]
    assert (cfg.slots, cfg.mask_dim, cfg.heads, cfg.pixel_block) == (128, 128, 8, "axial")


def test_the_stacked_decoder_passes_4_8_16_8_4_after_the_first_pass() -> None:
    """Thesis §4.3.3 (Fig. 4.3, Table 4.4's L): an L = 2 decoder runs the L = 0 decoder's
    pass (16 → 8 → 4), then visits strides 8, 16, 8, 4 twice, each stage a 3×3 conv of
    the resized feature plus the latest feature at that stride. §4.3.4: the semantic head
    then reads the first stride-4 output, and there is no separate semantic decoder.

    Oracle: the L = 0 model with the L = 2 model's shared weights gives the first pass
    (its decoder output is the L = 2 semantic head's input), and the extra stages'
    inputs are rebuilt from the captured stage outputs by resize-and-add."""
    import torch.nn.functional as F

    stacked = tiny(decoder_stacks=2).eval()
    assert stacked.semantic_decoder is None and len(stacked.decoder.stacked) == 2
    plain = tiny().eval()
    shared = {k: v for k, v in stacked.state_dict().items() if k in plain.state_dict()}
    missing = plain.load_state_dict(shared, strict=False).missing_keys
    assert missing and all(k.startswith("semantic_decoder.") for k in missing)
    seen = {"semantic": [], "inputs": [], "outputs": []}
    stacked.semantic_head.register_forward_pre_hook(lambda m, a: seen["semantic"].append(a[0]))
    first_pass = {}
    plain.decoder.register_forward_hook(lambda m, a, out: first_pass.update(y=out.features))
    plain.decoder.proj16.register_forward_hook(lambda m, a, out: first_pass.update(y16=out))
    plain.decoder.blocks8[-1].register_forward_hook(
        lambda m, a, out: first_pass.update(y8=out[0].permute(0, 3, 1, 2))
    )
    for convs in stacked.decoder.stacked:
        for conv in convs:
            conv.register_forward_pre_hook(lambda m, a: seen["inputs"].append(a[0]))
            conv.register_forward_hook(lambda m, a, out: seen["outputs"].append(out))
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = stacked(images), plain(images)
    (semantic,) = seen["semantic"]
    torch.testing.assert_close(semantic, first_pass["y"])
    # strides 8, 16, 8, 4 twice: 8×8, 4×4, 8×8, 16×16 cells of a 64-px image
    assert [tuple(x.shape[-2:]) for x in seen["inputs"]] == [(8, 8), (4, 4), (8, 8), (16, 16)] * 2
    latest = {8: first_pass["y8"], 16: first_pass["y16"], 4: first_pass["y"]}
    y = first_pass["y"]
    for stride, given, produced in zip((8, 16, 8, 4) * 2, seen["inputs"], seen["outputs"]):
        size = latest[stride].shape[-2:]
        resized = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        torch.testing.assert_close(given, resized + latest[stride])
        y = latest[stride] = produced
    assert out["mask_logits"].shape == (2, 8, 16, 16)
    with pytest.raises(InputError, match="decoder_stacks must be >= 0"):
        tiny(decoder_stacks=-1)


def test_a_stacked_model_trains_and_rebuilds_from_its_options() -> None:
    model = tiny(decoder_stacks=1).train()
    again = create_specialist("max-deeplab", 4, (1, 2, 3), **model.options())
    assert again.config.decoder_stacks == 1
    assert again.state_dict().keys() == model.state_dict().keys()
    semantic = torch.zeros(1, 32, 32, dtype=torch.int64)
    semantic[:, 4:20, 4:20] = 1
    instance = (semantic == 1).long()
    losses = model.loss(
        model(torch.randn(1, 3, 32, 32)), [PanopticTarget(semantic[0], instance[0])]
    )
    losses["loss"].backward()
    for part in (model.decoder.stacked, model.semantic_head, model.mask_feature):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def save_axial_checkpoint(path, **options):
    """An ``hbird pretrain``-style export of ``test_axial`` (4 stages) with ``options``."""
    from hbird.io.checkpoints import FORMAT, architecture_metadata
    from hbird.io.files import save_tensors
    from hbird.nn.axial_resnet import test_axial

    torch.manual_seed(3)
    model = test_axial(**options)
    meta = {
        "format": FORMAT,
        **architecture_metadata("test_axial", options, (0.5,) * 3, (0.2,) * 3),
    }
    save_tensors(path, dict(model.state_dict()), meta)
    return model.state_dict()


def test_a_4_stage_axial_resnet_checkpoint_fills_the_3_stage_backbone(tmp_path) -> None:
    """The tiny preset's backbone is test_axial without its last stage (depths 1, 1, 1,
    width 1/16, 2 heads, span 9, stem 8). A test_axial export loads: the stem and stages
    0-2 take the file's tensors, its stage 3 is left out; through the trainer too. A
    file of another width is refused, naming a tensor's two shapes and the options."""
    from hbird.data.panoptic_synthetic import SyntheticPanopticDataset
    from hbird.panoptic.training import SpecialistConfig, SpecialistTrainer

    source = save_axial_checkpoint(tmp_path / "axial.safetensors")
    assert any(k.startswith("stages.3.") for k in source)
    model = tiny()
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    model.load_backbone(str(tmp_path / "axial.safetensors"))
    loaded = model.backbone.state_dict()
    assert loaded.keys() == {k for k in source if not k.startswith("stages.3.")}
    for key, value in loaded.items():
        assert torch.equal(value, source[key]), key
    assert not torch.equal(before["conv1.weight"], loaded["conv1.weight"])  # it changed
    config = SpecialistConfig(
        specialist="max-deeplab",
        specialist_options={"preset": "tiny"},
        init_weights=str(tmp_path / "axial.safetensors"),
        out=str(tmp_path / "run"),
        batch_size=2,
        crop_size=32,
        num_workers=0,
    )
    data = SyntheticPanopticDataset(n=2, seed=0, size=32)
    trainer = SpecialistTrainer(config, dataset=data, log=lambda _: None)
    torch.testing.assert_close(
        trainer.module.backbone.stages[2][0].conv_up.weight, source["stages.2.0.conv_up.weight"]
    )
    save_axial_checkpoint(tmp_path / "wide.safetensors", width=1 / 8)
    with pytest.raises(
        InputError, match=r"other shapes, e\.g\. .* in the file vs .*backbone_width"
    ):
        tiny().load_backbone(str(tmp_path / "wide.safetensors"))
