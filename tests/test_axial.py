"""Position-sensitive axial attention (Wang 2021 thesis §3.3, eq. 3.3-3.4), Axial-ResNet and
the csrhddlam/axial-deeplab checkpoint converter."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch

from hbird.cli import main
from hbird.encoders import create_encoder
from hbird.nn import axial_resnet
from hbird.nn.axial import AxialAttention, AxialBlock, batch_norm_slice, relative_index

ALL = ("qk", "qr", "kr", "v", "rv")


def randomise_batchnorms(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is a real map."""
    gen = torch.Generator().manual_seed(seed)
    for bn in module.modules():
        if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            n = bn.num_features
            bn.running_mean.copy_(torch.randn(n, generator=gen))
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.weight.data.copy_(torch.randn(n, generator=gen))
            bn.bias.data.copy_(torch.randn(n, generator=gen))


def bn(x: float, norm: torch.nn.Module, c: int) -> torch.Tensor:
    """Eval-mode BatchNorm of one value of channel ``c`` (its formula, written out)."""
    scale = norm.weight[c] / torch.sqrt(norm.running_var[c] + norm.eps)
    return (x - norm.running_mean[c]) * scale + norm.bias[c]


def naive_axial(layer: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    """Eq. 3.4 by loops over batch, line, head, output position o and input position p.

    ``x (B, H, W, C)``; attention along ``layer.axis``; per head ``[q (d_q), k (d_q), v (d_out)]``
    channels of the projection; ``r_{p-o}`` is row ``p - o + m - 1`` of each table;
    ``|p - o| ≥ m`` is left out of the softmax.
    """
    if layer.axis == "height":
        return naive_axial_lines(layer, x.transpose(1, 2)).transpose(1, 2)
    return naive_axial_lines(layer, x)


def naive_axial_lines(layer: AxialAttention, x: torch.Tensor) -> torch.Tensor:
    b_size, lines, length, _ = x.shape
    g, dq, dv, m = layer.heads, layer.query_dim, layer.value_dim, layer.span
    out = torch.zeros(b_size, lines, length, layer.out_dim, dtype=x.dtype)
    sims, outs = layer.bn_similarity, layer.bn_output
    for b in range(b_size):
        for line in range(lines):
            proj = x[b, line] @ layer.qkv.weight.T  # (L, 2·out)
            proj = torch.stack(
                [
                    torch.stack([bn(proj[i, c], layer.bn_qkv, c) for c in range(proj.shape[1])])
                    for i in range(length)
                ]
            )
            for h in range(g):
                base = h * 2 * dv
                q, k = proj[:, base : base + dq], proj[:, base + dq : base + 2 * dq]
                v = proj[:, base + 2 * dq : base + 4 * dq]
                for o in range(length):
                    allowed = [p for p in range(length) if abs(p - o) < m]
                    logits = []
                    for p in allowed:
                        r = p - o + m - 1
                        terms = {
                            "qk": bn(q[o] @ k[p], sims, h),
                            "qr": bn(q[o] @ layer.rel_q[r], sims, g + h),
                            "kr": bn(k[p] @ layer.rel_k[r], sims, 2 * g + h),
                        }
                        logits.append(
                            sum((terms[t] for t in terms if t in layer.terms), x.new_zeros(()))
                        )
                    weights = torch.softmax(torch.stack(logits), dim=0)
                    sv = sum(a * v[p] for a, p in zip(weights, allowed))
                    sr = sum(a * layer.rel_v[p - o + m - 1] for a, p in zip(weights, allowed))
                    for c in range(dv):
                        ch = h * dv + c
                        y = x.new_zeros(())
                        if "v" in layer.terms:
                            y = y + bn(sv[c], outs, ch)
                        if "rv" in layer.terms:
                            y = y + bn(sr[c], outs, layer.out_dim + ch)
                        out[b, line, o, ch] = y
    return out


@pytest.mark.parametrize(
    "terms,span,axis",
    [
        (("qk", "v", "rv"), 9, "width"),
        (("qr", "v", "rv"), 9, "width"),
        (("kr", "v", "rv"), 9, "width"),
        (ALL, 3, "width"),  # span 3 < length 5: |p - o| >= 3 masked
        (ALL, 2, "height"),
    ],
)
def test_layer_matches_a_per_position_loop(terms, span, axis):
    """Inputs 2×3×5 (B×lines×L) per head; each similarity term alone, then all with masking."""
    torch.manual_seed(0)
    layer = AxialAttention(6, 8, heads=2, span=span, axis=axis, terms=terms).double().eval()
    randomise_batchnorms(layer, 1)
    shape = (2, 3, 5, 6) if axis == "width" else (2, 5, 3, 6)
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fast, slow = layer(x), naive_axial(layer, x)
    assert fast.shape == shape[:3] + (8,)
    assert torch.allclose(fast, slow, atol=1e-10)


@pytest.mark.parametrize("training", [True, False])
def test_per_term_batch_norm_is_the_norm_of_the_concatenation(training):
    """BN on each term by channel slices = one BN over the stacked terms, running statistics
    included (the layer never builds the stack)."""
    whole = torch.nn.BatchNorm2d(6).train(training)
    randomise_batchnorms(whole, 0)
    sliced = copy.deepcopy(whole)
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 2, 3, 5, generator=gen), torch.randn(4, 4, 3, 5, generator=gen)
    expected = whole(torch.cat([a, b], dim=1))
    got = torch.cat([batch_norm_slice(sliced, a, 0, 2), batch_norm_slice(sliced, b, 2, 6)], dim=1)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(sliced.running_mean, whole.running_mean)
    assert torch.allclose(sliced.running_var, whole.running_var)


def test_relative_index_by_hand():
    """Length 4, span 2: rows p - o + 1 clamped to [0, 2]; |p - o| >= 2 masked."""
    index, outside = relative_index(4, 2)
    assert index.tolist() == [[1, 2, 2, 2], [0, 1, 2, 2], [0, 0, 1, 2], [0, 0, 0, 1]]
    assert outside.tolist() == [
        [False, False, True, True],
        [False, False, False, True],
        [True, False, False, False],
        [True, True, False, False],
    ]
    index, outside = relative_index(3, 5)  # shorter than the span: global, rows 2..6
    assert index.tolist() == [[4, 5, 6], [3, 4, 5], [2, 3, 4]] and not outside.any()


def _plain(layer: AxialAttention) -> None:
    """Eval-mode BNs that are the identity up to eps; q = 1 (via bn_qkv's bias), k = 0, v = x."""
    for norm in (layer.bn_qkv, layer.bn_similarity, layer.bn_output):
        norm.eps = 0.0
    d = layer.value_dim
    with torch.no_grad():
        layer.qkv.weight.zero_()
        layer.bn_qkv.bias.zero_()
        for h in range(layer.heads):
            base = h * 2 * d
            layer.bn_qkv.bias[base : base + d // 2] = 1.0  # q
            for c in range(d):  # v copies input channel h·d + c
                layer.qkv.weight[base + d + c, h * d + c] = 1.0
        for table in (layer.rel_q, layer.rel_k, layer.rel_v):
            table.zero_()


def test_query_offsets_point_from_o_to_p_by_hand():
    """r^q_{+1} large ⇒ y_o = v_{o+1} (row p - o + m - 1 = m); the last position has no
    o+1 and, with its table rows all zero, averages the span: o-2..o."""
    layer = AxialAttention(4, 4, heads=1, span=3, terms=("qr", "v")).eval()
    _plain(layer)
    with torch.no_grad():
        layer.rel_q[3] = 50.0  # offset +1
        x = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 1, 5, 4).contiguous()
        y = layer(x)[0, 0, :, 0]
    assert torch.allclose(y, torch.tensor([1.0, 2.0, 3.0, 4.0, 3.0]), atol=1e-5)


def test_value_offsets_and_span_by_hand():
    """Uniform attention (no similarity term) and r^v_d = d: y_o is the mean offset inside
    the span: length 5, span 2 → offsets {0, +1}, {-1, 0, +1}, ..., {-1, 0}."""
    layer = AxialAttention(4, 4, heads=1, span=2, terms=("rv",)).eval()
    _plain(layer)
    with torch.no_grad():
        layer.rel_v.copy_(torch.arange(-1.0, 2.0).view(3, 1).expand(3, 4))
        y = layer(torch.randn(1, 1, 5, 4))[0, 0, :, 0]
    assert torch.allclose(y, torch.tensor([0.5, 0.0, 0.0, 0.0, -0.5]), atol=1e-6)


def test_any_length_and_stride_by_pooling():
    """Axes longer than the span, odd sizes; stride = 2×2 average pooling after the width layer."""
    torch.manual_seed(0)
    block = AxialBlock(16, 16, 32, stride=2, heads=8, span=5).eval()
    x = torch.randn(2, 7, 13, 16)
    y = block(x)
    assert y.shape == (2, 4, 7, 32) and torch.isfinite(y).all()
    layer = AxialAttention(16, 16, span=5, stride=2).eval()
    with torch.no_grad():
        unpooled = AxialAttention(16, 16, span=5)
        unpooled.load_state_dict(layer.state_dict())
        full = unpooled.eval()(x)
        pooled = layer(x)
    assert torch.allclose(pooled[:, 0, 0], full[:, :2, :2].mean(dim=(1, 2)), atol=1e-6)
    assert torch.allclose(pooled[:, 3, 6], full[:, 6, 12], atol=1e-6)  # the odd edge


def train_shift(terms, steps=200, width=24, channels=32, seed=0):
    """Fit y_o = x_{o+3} along the width with one layer; return eval MSE at widths 24 and 40."""
    torch.manual_seed(seed)
    layer = AxialAttention(channels, channels, heads=8, span=width, terms=terms)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 1, width, channels, generator=gen)
        loss = ((layer(x)[:, :, :-3] - x[:, :, 3:]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    layer.eval()
    with torch.no_grad():
        errors = []
        for w in (width, 40):
            x = torch.randn(64, 1, w, channels, generator=gen)
            errors.append(float(((layer(x)[:, :, :-3] - x[:, :, 3:]) ** 2).mean()))
    return errors


@pytest.mark.slow
def test_position_sensitivity_learns_a_shift_that_content_attention_cannot():
    """Issue 12 acceptance: eq. 3.3's relative terms let one layer copy x_{o+3} (MSE < 0.05,
    also at the unseen width 40, offsets beyond the span masked); content-only attention
    (q_oᵀk_p, v_p) has no notion of offset and stays above 0.5."""
    assert max(train_shift(ALL)) < 0.05
    assert min(train_shift(("qk", "v"))) > 0.5


# -- Axial-ResNet -------------------------------------------------------------------------


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_axial_resnet_layout():
    """ResNet-50 layout [3, 4, 6, 3]; S = ×0.5: bottleneck 64 after the stem, d_q = 4 and
    d_out = 8 per head (thesis §3.4.1: L has 128, 8, 16), blocks output 2× their width."""
    model = axial_resnet.axial_resnet("s")
    assert [len(s) for s in model.stages] == [3, 4, 6, 3]
    assert model.stage_channels == (128, 256, 512, 1024) and model.stage_strides == (4, 8, 16, 32)
    first = model.stages[0][0].height_block
    assert (first.in_dim, first.heads, first.query_dim, first.value_dim) == (64, 8, 4, 8)
    assert [b.height_block.span for b in model.stages[1]] == [56, 28, 28, 28]  # global at 224
    deeplab = axial_resnet.axial_deeplab("l", depths=(1, 2, 1, 2))  # few blocks: cheap
    assert deeplab.stage_strides == (4, 8, 16, 16) and deeplab.stage_channels[-1] == 2048
    assert {b.width_block.span for s in deeplab.stages for b in s} == {65}
    first = deeplab.stages[0][0].height_block
    assert (first.in_dim, first.query_dim, first.value_dim) == (128, 8, 16)  # Fig. 3.1
    assert 11e6 < count(axial_resnet.axial_resnet("s", num_classes=1000)) < 12.5e6


TABLE_B3_PARAMS = {0.375: 7.4e6, 0.5: 12.4e6, 0.75: 26.4e6, 1.0: 45.6e6}
"""Thesis Table B.3, Conv-Stem + Axial-Attention with its classifier, by width multiplier."""


def test_the_gap_to_table_b3_is_linear_in_the_width(monkeypatch):
    """Our parameter count differs from Table B.3 at every width by one constant times the
    width (to the table's rounding, ±0.05M): what the layout decides (1×1 convolutions and
    q/k/v projections) grows with width², so a wrong layout would open a quadratic gap
    (docs/backbones.md, "What it costs"). Weights are not initialised: only shapes count."""
    from torch import nn

    for module in (nn.Linear, nn.Conv2d, AxialAttention):
        monkeypatch.setattr(module, "reset_parameters", lambda self: None)
    monkeypatch.setattr(axial_resnet.AxialResNet, "_init_weights", lambda self, zero: None)
    low, high = [], []  # the per-unit-width gap each table entry allows
    for width, table in TABLE_B3_PARAMS.items():
        ours = count(axial_resnet.AxialResNet(width=width, num_classes=1000))
        low.append((table - 0.05e6 - ours) / width)
        high.append((table + 0.05e6 - ours) / width)
    assert max(low) <= min(high), (low, high)  # one gap per unit width fits all four
    assert 1.5e6 < max(low) and min(high) < 1.8e6  # about 1.63M · width


def _their_layout(model: axial_resnet.AxialResNet) -> dict[str, torch.Tensor]:
    """Re-key a model into csrhddlam/axial-deeplab's layout, written from their module
    definitions: ``layer{i+1}``, ``hight_block``, ``qkv_transform`` (Conv1d), 1×1 Conv2d
    ``conv_down``/``conv_up``/``downsample.0``, one ``relative (2·d_out, 2K-1)`` table per
    layer whose q and v rows are indexed by o - p, ``bn_output`` channels interleaved."""
    out = {}
    for key, value in model.state_dict().items():
        name = re.sub(r"^stages\.(\d+)\.", lambda m: f"layer{int(m.group(1)) + 1}.", key)
        name = name.replace("height_block", "hight_block").replace("shortcut", "downsample")
        name = name.replace(".qkv.", ".qkv_transform.")
        if name.endswith("rel_k") or name.endswith("rel_v"):
            continue
        if name.endswith("rel_q"):
            prefix = key[: -len("rel_q")]
            state = model.state_dict()
            q, k, v = (state[prefix + t] for t in ("rel_q", "rel_k", "rel_v"))
            offsets = q.shape[0]
            backwards = torch.arange(offsets - 1, -1, -1)  # their column t holds our row 2K-2-t
            relative = torch.cat([q[backwards].T, k.T, v[backwards].T], dim=0)
            out[name[: -len("rel_q")] + "relative"] = relative
            kernel = (offsets + 1) // 2
            rows, cols = torch.arange(kernel).unsqueeze(1), torch.arange(kernel).unsqueeze(0)
            out[name[: -len("rel_q")] + "flatten_index"] = (rows - cols + kernel - 1).view(-1)
            continue
        if ".bn_output." in name and value.ndim == 1 and value.numel() > 1:
            half = value.numel() // 2
            value = torch.stack([value[:half], value[half:]], dim=1).reshape(-1)
        if name.endswith("qkv_transform.weight"):
            value = value.unsqueeze(-1)
        elif value.ndim == 2 and not name.startswith("fc."):
            value = value[:, :, None, None]
        out[name] = value
    return out


def their_attention(state: dict[str, torch.Tensor], prefix: str, x: torch.Tensor, groups: int):
    """Their AxialAttention forward along the last axis of ``x (N, C, L)``, eval mode,
    written from its definition: embeddings ``E[c, i, j] = relative[c, i - j + K - 1]``;
    ``qr[i, j] = Σ_c q[c, i] E_q[c, i, j]``; ``kr[i, j] = Σ_c k[c, j] E_k[c, j, i]``;
    ``sve[c, i] = Σ_j a[i, j] E_v[c, i, j]``."""

    def norm(t, name, dim):
        shape = [1] * t.ndim
        shape[dim] = -1
        s = {
            k: state[f"{prefix}{name}.{k}"].view(shape)
            for k in ("running_mean", "running_var", "weight", "bias")
        }
        return (t - s["running_mean"]) / torch.sqrt(s["running_var"] + 1e-5) * s["weight"] + s[
            "bias"
        ]

    n, _, length = x.shape
    qkv = norm(
        torch.einsum("oc,ncl->nol", state[prefix + "qkv_transform.weight"][:, :, 0], x), "bn_qkv", 1
    )
    gp2 = qkv.shape[1] // groups
    qkv = qkv.view(n, groups, gp2, length)
    q, k, v = qkv.split([gp2 // 4, gp2 // 4, gp2 // 2], dim=2)
    relative = state[prefix + "relative"]
    i, j = torch.arange(length).view(-1, 1), torch.arange(length).view(1, -1)
    emb = relative[:, i - j + length - 1]  # (2·d_out, L, L) [c, i, j]
    eq, ek, ev = emb.split([gp2 // 4, gp2 // 4, gp2 // 2], dim=0)
    qr = torch.einsum("ngci,cij->ngij", q, eq)
    kr = torch.einsum("ngcj,cji->ngij", k, ek)
    qk = torch.einsum("ngci,ngcj->ngij", q, k)
    sim = norm(torch.cat([qk, qr, kr], dim=1), "bn_similarity", 1)
    attn = sim.view(n, 3, groups, length, length).sum(dim=1).softmax(dim=-1)
    sv = torch.einsum("ngij,ngcj->ngci", attn, v)
    sve = torch.einsum("ngij,cij->ngci", attn, ev)
    stacked = torch.cat([sv, sve], dim=-1).reshape(n, -1, length)  # channel 2c + term
    return norm(stacked, "bn_output", 1).view(n, -1, 2, length).sum(dim=2)


def test_converter_matches_their_attention_layer():
    """A layer converted from their layout computes their forward (feature size = kernel K)."""
    torch.manual_seed(0)
    model = axial_resnet.test_axial().eval()
    randomise_batchnorms(model, 3)
    theirs = _their_layout(model)
    ours = axial_resnet.from_axial_deeplab(theirs)
    layer = model.stages[0][0].width_block
    layer.load_state_dict(
        {
            k[len("stages.0.0.width_block.") :]: v
            for k, v in ours.items()
            if k.startswith("stages.0.0.width_block.")
        }
    )
    length = layer.span  # their layers only take their kernel size
    x = torch.randn(3, length, layer.in_dim)
    with torch.no_grad():
        mine = layer(x.view(3, 1, length, -1))[:, 0]  # (N, L, C)
        reference = their_attention(theirs, "layer1.0.width_block.", x.transpose(1, 2), layer.heads)
    assert torch.allclose(mine, reference.transpose(1, 2), atol=1e-5)


def test_their_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    """A tiny model re-keyed into their layout (inside DataParallel's ``module.`` and with a
    1000-class ``fc``) loads as test_axial and gives the same features."""
    encoder = create_encoder("test_axial", seed=5)
    randomise_batchnorms(encoder.model, 4)
    theirs = {f"module.{k}": v for k, v in _their_layout(encoder.model).items()}
    theirs["module.fc.weight"], theirs["module.fc.bias"] = torch.randn(1000, 128), torch.randn(1000)
    path = tmp_path / "axial_tiny.pth"
    torch.save(theirs, path)
    loaded = create_encoder("test_axial", weights=path)
    x = encoder.normalize(torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():
        assert torch.equal(loaded(x, layers=[1, -1]), encoder(x, layers=[1, -1]))
    assert loaded.identity()["weights_hash"] == encoder.identity()["weights_hash"]


def test_test_axial_builds_a_bank_and_runs_hbird_eval(tmp_path, folder_dataset):
    """End to end through the CLI: the quick preset on a synthetic folder, two stages."""
    out, bank = tmp_path / "run", tmp_path / "bank"
    common = ["--encoder", "test_axial", "--quiet"]
    argv = ["eval", "--dataset", folder_dataset, "--preset", "quick", "--out", str(out)]
    assert main([*argv, *common, "layers=2,3", "image_size=64"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["encoder"] == "test_axial"
    assert 0.0 <= metrics["metrics"]["miou"] <= 1.0 and math.isfinite(metrics["metrics"]["miou"])
    root = folder_dataset.split("root=")[1].split(":")[0]
    argv = [
        "bank",
        "build",
        "--prompt",
        f"{root}/train",
        "--out",
        str(bank),
        "--task",
        "segmentation",
    ]
    assert main([*argv, *common, "--image-size", "64"]) == 0
    assert main(["bank", "info", str(bank)]) == 0
    probe = tmp_path / "probe"  # the linear probe takes the same features unchanged
    argv = ["eval", "--dataset", folder_dataset, "--preset", "quick", "--out", str(probe)]
    assert main([*argv, *common, "image_size=64", "--protocol", "linear", "--epochs", "1"]) == 0
    assert json.loads((probe / "metrics.json").read_text())["metrics"]["train_loss"] > 0


def test_their_tables_resize_to_another_span_by_hand(tmp_path):
    """Span 9 tables loaded into span 13: the 17 learned offsets kept in the middle, the
    outermost repeated; inputs whose axes all fit in span 9 give the same features."""
    encoder = create_encoder("test_axial", seed=1)
    randomise_batchnorms(encoder.model, 2)
    path = tmp_path / "theirs.pth"
    torch.save(_their_layout(encoder.model), path)
    wider = create_encoder("test_axial", weights=path, span=13)
    small, big = (
        encoder.model.stages[0][0].width_block.rel_k,
        wider.model.stages[0][0].width_block.rel_k,
    )
    assert big.shape[0] == 25 and torch.equal(big[4:21], small)
    assert torch.equal(big[:4], small[:1].expand(4, -1)) and torch.equal(
        big[21:], small[-1:].expand(4, -1)
    )
    x = encoder.normalize(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():  # stage 1 is 8×8: every offset |p - o| <= 7 is in both tables
        assert torch.allclose(wider(x), encoder(x), atol=1e-6)
