"""ELASTIC (Wang's thesis ch. 2): the layer's sampling paths, its cost, the scale policy
score and allenai/elastic's checkpoint layout, against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from hbird.nn.elastic import (
    MODELS,
    Bottleneck,
    build_elastic,
    convert_allenai_state_dict,
    downsample,
    scale_policy_scores,
    upsample,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_flops(module: torch.nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return counter.get_total_flops()


# -- D and U on odd sizes, by hand ------------------------------------------------------------


def test_downsample_pads_odd_sides_by_replication():
    """D of a 3×3 input: replicate-pad to 4×4, then 2×2 means (thesis §2.4 "average pooling")."""
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]]
    # padded: [[1,2,3,3],[4,5,6,6],[7,8,9,9],[7,8,9,9]]
    want = torch.tensor([[(1 + 2 + 4 + 5) / 4, (3 + 3 + 6 + 6) / 4], [(7 + 8 + 7 + 8) / 4, 9.0]])
    assert torch.equal(downsample(x)[0, 0], want)
    assert downsample(torch.zeros(2, 3, 5, 8)).shape == (2, 3, 3, 4)


def test_upsample_is_bilinear_times_two_cropped():
    """U of [[a, b], [c, d]] to 3×3: along each axis ×2 bilinear (half-pixel centres, edges
    clamped) gives [a, ¾a + ¼b, ¼a + ¾b, b]; the fourth sample is cropped away."""
    a, b, c, d = 1.0, 2.0, 5.0, 11.0
    x = torch.tensor([[a, b], [c, d]]).view(1, 1, 2, 2)

    def line(p: float, q: float) -> list[float]:
        return [p, 0.75 * p + 0.25 * q, 0.25 * p + 0.75 * q]

    rows = [line(a, b), line(c, d)]
    want = torch.tensor([[line(rows[0][j], rows[1][j])[i] for j in range(3)] for i in range(3)])
    torch.testing.assert_close(upsample(x, (3, 3))[0, 0], want)
    assert upsample(torch.zeros(1, 2, 4, 3), (7, 5)).shape == (1, 2, 7, 5)


# -- the block keeps the plain block's parameters and costs 5/8 of it --------------------------


def resnext_blocks(groups=32, base_width=4, planes=64):
    torch.manual_seed(0)
    inplanes = planes * 4  # a stride-1 block inside a stage (no projection)
    plain = Bottleneck(inplanes, planes, groups, base_width).eval()
    elastic = Bottleneck(inplanes, planes, groups, base_width, elastic=True).eval()
    return plain, elastic, inplanes


def test_elastic_block_has_exactly_the_plain_blocks_parameters():
    """Table 2.1 / Fig. 2.3: same parameters. ResNeXt-50 conv2 block (256 in, 128 wide, C=32):
    by hand 256·128 + 128·4·9 + 128·256 weights and 2·128 + 2·128 + 2·256 BN values."""
    torchvision = pytest.importorskip("torchvision")
    plain, elastic, inplanes = resnext_blocks()
    by_hand = 256 * 128 + 128 * (128 // 32) * 9 + 128 * 256 + 2 * (128 + 128 + 256)
    reference = torchvision.models.resnet.Bottleneck(inplanes, 64, groups=32, base_width=4)
    assert n_params(elastic) == n_params(plain) == by_hand == n_params(reference)
    shapes = sorted(p.numel() for p in elastic.parameters())
    assert len(shapes) == 2 * 7 + 2  # two branches (3 convs + 2 BNs each), one shared BN


def test_resnet_elastic_block_has_a_two_group_3x3():
    """ResNet has one group, which cannot be halved: each branch's 3×3 keeps one group, so
    the block has the parameters of a plain block whose 3×3 has two groups."""
    plain2, _, _ = resnext_blocks(groups=2, base_width=32)  # width 64 in two groups
    _, elastic, _ = resnext_blocks(groups=1, base_width=64)  # width 64, branches 32 each
    assert n_params(elastic) == n_params(plain2)


@pytest.mark.parametrize("side", [16, 15])
def test_elastic_block_costs_five_eighths(side):
    """Multiply-adds counted on the real modules (FlopCounterMode): the high branch costs
    half the plain block, the low one an eighth (Table 2.1 with b = 2, r = 1, 2). On an odd
    side n the low branch runs at ⌈n/2⌉, so the ratio is ½ + ½·⌈n/2⌉²/n²."""
    plain, elastic, inplanes = resnext_blocks()
    x = torch.randn(1, inplanes, side, side)
    ratio = conv_flops(elastic, x) / conv_flops(plain, x)
    low = -(-side // 2)
    assert ratio == pytest.approx(0.5 + 0.5 * low**2 / side**2, rel=1e-12)
    if side % 2 == 0:
        assert ratio == pytest.approx(5 / 8, rel=1e-12)


@pytest.mark.parametrize("size", [(7, 9), (5, 5), (1, 3)])
def test_elastic_block_preserves_odd_sizes(size):
    plain, elastic, inplanes = resnext_blocks(groups=4, base_width=8, planes=16)
    x = torch.randn(2, inplanes, *size)
    with torch.no_grad():
        assert elastic(x).shape == plain(x).shape == x.shape


def test_elastic_block_is_eq_2_3():
    """F(x) = σ(BN(T_high(x) + U(T_low(D(x)))) + x), the branches' sum before one BN,
    computed here from the branch modules with D and U written out by hand."""
    _, block, inplanes = resnext_blocks(groups=4, base_width=8, planes=16)
    for bn in [block.high.bn1, block.low.bn2, block.bn3]:  # non-trivial statistics
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(1, inplanes, 5, 7)
    padded = torch.cat([x, x[:, :, -1:]], dim=2)  # 6 × 7, replicate the last row
    padded = torch.cat([padded, padded[:, :, :, -1:]], dim=3)  # 6 × 8
    low_in = padded.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))  # (1, C, 3, 4)
    with torch.no_grad():
        low = block.low(low_in)
        up = F.interpolate(low, size=(6, 8), mode="bilinear", align_corners=False)[..., :5, :7]
        want = torch.relu(block.bn3(block.high(x) + up) + x)
        torch.testing.assert_close(block(x), want)


# -- models --------------------------------------------------------------------------------


def test_models_match_the_thesis_parameter_counts():
    """Table A.3 (with the 1000-way classifier, 2048·1000 + 1000 parameters, added back):
    ResNeXt50+Elastic 25.2M, ResNeXt50+sElastic 25.0M; ResNeXt50+Elastic has 17 Elastic
    blocks (§2.4.2: "the 17 Elastic blocks")."""
    classifier = 2048 * 1000 + 1000
    elastic = build_elastic("elastic_resnext50")
    selastic = build_elastic("selastic_resnext50")
    assert round((n_params(elastic) + classifier) / 1e6, 1) == 25.2
    assert round((n_params(selastic) + classifier) / 1e6, 1) == 25.0
    assert len(elastic.elastic_blocks()) == 17 and len(selastic.elastic_blocks()) == 3 + 3 + 5
    assert len(build_elastic("elastic_resnet50").elastic_blocks()) == 17


@pytest.mark.slow
def test_model_multiply_adds_match_the_thesis():
    """Table A.3 at 224 × 224 (output stride 32): ResNeXt50+Elastic 4.2B, +sElastic 3.4B
    (measured 4.17B and 3.35B: within 2% of the thesis' figures, which it rounds to 0.1B)."""
    x = torch.randn(1, 3, 224, 224)
    for name, want in [("elastic_resnext50", 4.2), ("selastic_resnext50", 3.4)]:
        model = build_elastic(name, output_stride=32).eval()
        assert conv_flops(model, x) / 2 / 1e9 == pytest.approx(want, rel=0.02), name


@pytest.mark.parametrize("output_stride", [16, 32])
def test_model_strides_and_odd_inputs(output_stride):
    model = build_elastic("test_elastic", seed=0, output_stride=output_stride).eval()
    assert model.stage_strides == ((4, 8, 16, 16) if output_stride == 16 else (4, 8, 16, 32))
    assert model.stage_channels == (16, 32, 64, 128)
    plain = build_elastic("test_elastic", seed=0, output_stride=output_stride, elastic_stages=0)
    with torch.no_grad():
        for size in [(64, 64), (67, 45)]:
            x = torch.randn(1, 3, *size)
            assert model(x).shape == plain.eval()(x).shape
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        first, last = model.forward_stages(x, [0, -1])
        torch.testing.assert_close(last, model(x))
        grid = (-(-64 // output_stride), -(-48 // output_stride))
        assert first.shape == (2, 16, 16, 12) and last.shape == (2, 128, *grid)


def test_seed_fixes_the_weights_without_touching_the_global_rng():
    state = torch.random.get_rng_state()
    a, b = build_elastic("test_elastic", seed=3), build_elastic("test_elastic", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.conv1.weight, build_elastic("test_elastic", seed=4).conv1.weight)


# -- scale policy -----------------------------------------------------------------------------


def test_scale_policy_score_is_eq_2_5():
    """S = mean(x_high) − mean(x_low) of the activations after the 3×3 conv, BN and ReLU
    of each branch, per image and Elastic block, recomputed here block by block."""
    model = build_elastic("test_elastic", seed=0).eval()
    images = torch.randn(3, 3, 40, 56)
    scores = scale_policy_scores(model, images)
    blocks = model.elastic_blocks()
    assert scores.shape == (3, len(blocks)) == (3, 4)  # stages 1-3: 2 + 1 + 1

    def after_3x3(branch, x):
        x = torch.relu(branch.bn1(branch.conv1(x)))
        return torch.relu(branch.bn2(branch.conv2(x)))

    want, seen = [], 0
    with torch.no_grad():
        x = model.stem(images)
        for stage in model.stage_modules():
            for block in stage:
                if block.elastic:
                    high = after_3x3(block.high, x).mean(dim=(1, 2, 3))
                    low = after_3x3(block.low, downsample(x)).mean(dim=(1, 2, 3))
                    want.append(high - low)
                    seen += 1
                x = block(x)
    assert seen == len(blocks)
    torch.testing.assert_close(scores, torch.stack(want, dim=1))
    assert scores.abs().sum() > 0


# -- allenai/elastic checkpoints ------------------------------------------------------------


def to_allenai_layout(model) -> dict[str, torch.Tensor]:
    """Write ``model``'s weights as allenai/elastic's ResNext saves them: every block has
    a branch and a ``_d`` branch of half the width; plain blocks are split in halves."""
    out = {}
    for key, value in model.state_dict().items():
        parts = key.split(".")
        if len(parts) > 3 and parts[2] in ("high", "low"):
            suffix = "_d" if parts[2] == "low" else ""
            out[".".join(parts[:2] + [parts[3] + suffix] + parts[4:])] = value
        elif len(parts) > 3 and parts[2] == "branch":
            layer, param = parts[3], ".".join(parts[4:])
            base = ".".join(parts[:2])
            if param == "num_batches_tracked":
                halves = (value, value)
            else:
                halves = value.chunk(2, dim=1 if layer == "conv3" else 0)
            out[f"{base}.{layer}.{param}"] = halves[0]
            out[f"{base}.{layer}_d.{param}"] = halves[1]
        else:
            out[key] = value
    out["fc.weight"], out["fc.bias"] = torch.zeros(10, model.embed_dim), torch.zeros(10)
    return out


def allenai_block(sd: dict[str, torch.Tensor], prefix: str, x, groups: int, stride: int):
    """allenai/elastic's non-Elastic block from its own keys: two full-resolution branches
    summed before bn3 (written from their layout, not from this package's modules)."""

    def bn(name, y):
        return F.batch_norm(
            y, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
            sd[f"{name}.bias"], training=False,
        )  # fmt: skip

    def branch(s):
        y = torch.relu(bn(f"{prefix}.bn1{s}", F.conv2d(x, sd[f"{prefix}.conv1{s}.weight"])))
        y = F.conv2d(y, sd[f"{prefix}.conv2{s}.weight"], stride=stride, padding=1, groups=groups)
        y = torch.relu(bn(f"{prefix}.bn2{s}", y))
        return F.conv2d(y, sd[f"{prefix}.conv3{s}.weight"])

    residual = F.conv2d(x, sd[f"{prefix}.downsample.0.weight"], stride=stride)
    residual = bn(f"{prefix}.downsample.1", residual)
    return torch.relu(bn(f"{prefix}.bn3", branch("") + branch("_d")) + residual)


def perturbed_tiny(seed=0):
    model = build_elastic("test_elastic", seed=seed).eval()
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def test_allenai_checkpoint_converts_to_the_same_function():
    model = perturbed_tiny()
    theirs = to_allenai_layout(model)
    assert any(k.endswith("conv1_d.weight") for k in theirs)
    converted = convert_allenai_state_dict(theirs, model)
    assert converted.keys() == model.state_dict().keys()
    assert model.convert_state_dict(theirs).keys() == converted.keys()
    own = model.state_dict()
    assert all(a is b for a, b in zip(model.convert_state_dict(own).values(), own.values()))
    fresh = build_elastic("test_elastic", seed=9).eval()
    fresh.load_state_dict(converted)
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
        # a plain (stride) block, against their two-branch function from their own keys
        h = model.layer1(model.stem(x))
        ours = fresh.layer2[0](h)
        groups = MODELS["test_elastic"].groups // 2
        torch.testing.assert_close(ours, allenai_block(theirs, "layer2.0", h, groups, 2))


def test_allenai_checkpoint_missing_half_is_named():
    model = perturbed_tiny()
    theirs = to_allenai_layout(model)
    del theirs["layer2.0.conv2_d.weight"]
    with pytest.raises(ValueError, match=r"layer2\.0\.conv2_d\.weight"):
        convert_allenai_state_dict(theirs, model)


def test_scale_policy_picture(tmp_path):
    from PIL import Image

    from hbird.viz.scale_policy import plot_scale_policy

    scores = torch.linspace(-1, 1, 5 * 4).view(5, 4)
    path = plot_scale_policy(tmp_path / "sp.png", scores, stage_of_block=[1, 1, 2, 3], dpi=50)
    assert Image.open(path).size == (9 * 50, int(3.6 * 50))
    assert not list(tmp_path.glob(".*tmp*"))  # written atomically, nothing left behind
    with pytest.raises(ValueError, match="stage_of_block has 2 entries for 4 blocks"):
        plot_scale_policy(tmp_path / "bad.png", scores, stage_of_block=[1, 2])
    with pytest.raises(ValueError, match=r"\(images, blocks\)"):
        plot_scale_policy(tmp_path / "bad.png", scores[0])
    assert not (tmp_path / "bad.png").exists()


def test_allenai_pth_tar_loads_through_the_encoder_registry(tmp_path):
    """Their file: ``torch.save({"state_dict": {"module.…": …}, "epoch": …})`` as .pth.tar."""
    from hbird.encoders import create_encoder

    model = perturbed_tiny()
    theirs = {f"module.{k}": v for k, v in to_allenai_layout(model).items()}
    path = tmp_path / "test_elastic.pth.tar"
    torch.save({"epoch": 120, "arch": "resnext50_elastic", "state_dict": theirs}, path)
    encoder = create_encoder("test_elastic", weights=path)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        want = model(x).permute(0, 2, 3, 1)
        torch.testing.assert_close(encoder.forward_patches(x), want)


def test_a_truncated_allenai_file_is_an_input_error_naming_file_and_key(tmp_path):
    """The converter's complaint (a block without its ``_d`` half) names the file and the
    key as an input error (the CLI prints those as one line, not a traceback)."""
    from hbird.encoders import create_encoder
    from hbird.errors import InputError

    theirs = to_allenai_layout(perturbed_tiny())
    del theirs["layer2.0.conv2_d.weight"]
    path = tmp_path / "cut.pth"
    torch.save(theirs, path)
    with pytest.raises(InputError, match=rf"{path}.*test_elastic.*layer2\.0\.conv2_d\.weight"):
        create_encoder("test_elastic", weights=path)
