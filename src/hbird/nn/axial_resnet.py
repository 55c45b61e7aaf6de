"""Axial-ResNet and the Axial-DeepLab backbone (Wang 2021, thesis §3.3.2 and §3.4.1).

A ResNet-50 layout (``[3, 4, 6, 3]`` bottlenecks after the 7×7-conv + max-pool stem)
whose 3×3 convolutions are replaced by a height and a width axial-attention layer
(:class:`~hbird.nn.axial.AxialBlock`). Axial-ResNet-L has bottleneck width 128 after the
stem (``d_in = 128``, ``d_q = 8``, ``d_out = 16`` per head, 8 heads), doubled at every
stride; S / M / XL multiply all channels by 0.5 / 0.75 / 2. Blocks output twice their
bottleneck width.

* :func:`axial_resnet` — the ImageNet conv-stem model: output stride 32, each block's
  span the size of its input at 224 px (56, 28, 14, 7: global at 224, as the thesis
  and the published checkpoints).
* :func:`axial_deeplab` — the segmentation backbone: the last stage's stride removed
  (output stride 16) and span ``m = 65`` in every block.

The model exposes its stages for :mod:`hbird.encoders.conv_backbone`:
``stage_channels``, ``stage_strides``, ``forward_stages(x, stages)`` (NCHW maps),
``gradient_layer`` (the last block's ``conv_up``, an ``nn.Linear`` on the output grid's
tokens) and ``convert_state_dict`` (csrhddlam/axial-deeplab checkpoints → these keys).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from hbird.nn.axial import AxialBlock

RESNET50_DEPTHS = (3, 4, 6, 3)
WIDTH_MULTIPLIERS = {"s": 0.5, "m": 0.75, "l": 1.0, "xl": 2.0}
DEEPLAB_SPAN = 65
"""The span of every block of Axial-DeepLab on large inputs (thesis §3.3.2)."""


class AxialResNet(nn.Module):
    """Conv stem + four stages of axial-attention bottlenecks.

    Args:
        depths: blocks per stage.
        width: channel multiplier (0.5 = S, 0.75 = M, 1 = L, 2 = XL).
        heads: attention heads of every layer.
        span: ``m`` of every block; ``None`` gives each block the size of its input at
            ``reference_size`` (the ImageNet models' global span).
        output_stride: 32, or 16 (the last stage keeps its input's resolution).
        num_classes: a linear classifier on the pooled last stage (0: none).
        stem_width: channels of the stem (default ``64 · width``).
        zero_init_residual: start every residual branch at zero (the ImageNet recipe).
        reference_size: the input side ``span=None`` refers to.
    """

    def __init__(
        self,
        depths: Sequence[int] = RESNET50_DEPTHS,
        width: float = 0.5,
        heads: int = 8,
        span: int | None = None,
        output_stride: int = 32,
        num_classes: int = 0,
        stem_width: int | None = None,
        zero_init_residual: bool = True,
        reference_size: int = 224,
    ) -> None:
        super().__init__()
        if output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {output_stride}")
        stem = stem_width or int(64 * width)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        strides = (1, 2, 2, 2 if output_stride == 32 else 1)
        stages, channels, cumulative = [], [], []
        in_dim, at = stem, 4  # input pixels per cell at the stage input
        for i, depth in enumerate(depths):
            planes = int(128 * width) * 2**i
            blocks = []
            for j in range(depth):
                stride = strides[i] if j == 0 else 1
                m = span if span is not None else max(1, reference_size // at)
                blocks.append(AxialBlock(in_dim, planes, 2 * planes, stride, heads, m))
                in_dim, at = 2 * planes, at * stride
            stages.append(nn.Sequential(*blocks))
            channels.append(in_dim)
            cumulative.append(at)
        self.stages = nn.ModuleList(stages)
        self.stage_channels = tuple(channels)
        self.stage_strides = tuple(cumulative)
        self.num_features = in_dim
        self.fc = nn.Linear(in_dim, num_classes) if num_classes else None
        self.gradient_layer = f"stages.{len(stages) - 1}.{depths[-1] - 1}.conv_up"
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Conv2d) or (
                isinstance(module, nn.Linear) and not name.endswith("qkv") and name != "fc"
            ):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, AxialBlock):
                    nn.init.zeros_(module.bn2.weight)

    def forward_stages(self, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → the outputs ``(B, C_i, H/s_i, W/s_i)`` of ``stages`` (in that
        order); stages after the last one asked for are not run."""
        y = self.maxpool(self.relu(self.bn1(self.conv1(x)))).permute(0, 2, 3, 1)  # (B, h, w, C)
        wanted, out = set(stages), {}
        for i, stage in enumerate(self.stages[: max(wanted) + 1]):
            y = stage(y)
            if i in wanted:
                out[i] = y.permute(0, 3, 1, 2)
        return [out[i] for i in stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → class logits ``(B, K)`` (pooled features without a classifier)."""
        (last,) = self.forward_stages(x, [len(self.stages) - 1])
        pooled = last.mean(dim=(2, 3))
        return self.fc(pooled) if self.fc is not None else pooled

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """csrhddlam/axial-deeplab keys → these (other layouts are returned as they are).

        Their ImageNet tables cover each block's size at 224 px; a model with another span
        (Axial-DeepLab's 65) gets them resized by :func:`resize_offset_table`.
        """
        if not any(".hight_block." in k for k in state_dict):
            return dict(state_dict)
        converted = from_axial_deeplab(state_dict)
        own = self.state_dict()
        for key, table in converted.items():
            if key.rsplit(".", 1)[-1] in ("rel_q", "rel_k", "rel_v") and key in own:
                converted[key] = resize_offset_table(table, own[key].shape[0])
        return converted


def axial_resnet(size: str = "s", **kwargs) -> AxialResNet:
    """Axial-ResNet-{S, M, L, XL} with the conv stem (thesis Table 3.1), output stride 32.

    ``kwargs`` go to :class:`AxialResNet` (a ``width`` given there replaces the size's).
    """
    return AxialResNet(**{"width": _width(size), **kwargs})


def axial_deeplab(size: str = "s", **kwargs) -> AxialResNet:
    """The Axial-DeepLab backbone: Axial-ResNet with output stride 16 and span 65."""
    return AxialResNet(
        **{"width": _width(size), "output_stride": 16, "span": DEEPLAB_SPAN, **kwargs}
    )


def test_axial(**kwargs) -> AxialResNet:
    """A tiny Axial-DeepLab-like model for tests: depths [1, 1, 1, 1], width 1/16 (bottleneck
    8 → 64 channels), 2 heads, span 9, output stride 16; residual branches not zeroed so
    the attention shapes its random features."""
    options = {
        "depths": (1, 1, 1, 1),
        "width": 1 / 16,
        "heads": 2,
        "span": 9,
        "output_stride": 16,
        "stem_width": 8,
        "zero_init_residual": False,
        **kwargs,
    }
    return AxialResNet(**options)


def _width(size: str) -> float:
    if size not in WIDTH_MULTIPLIERS:
        raise ValueError(f"size must be one of {', '.join(WIDTH_MULTIPLIERS)}, got {size!r}")
    return WIDTH_MULTIPLIERS[size]


# -- csrhddlam/axial-deeplab checkpoints ------------------------------------------------

_THEIR_BLOCK = re.compile(r"^layer(\d+)\.")


def resize_offset_table(table: torch.Tensor, offsets: int) -> torch.Tensor:
    """A ``(2K-1, d)`` relative-embedding table → ``(2m-1, d)``, centred on offset 0:
    cropped to ``|p - o| < m``, or padded by repeating the outermost learned offsets."""
    have = (table.shape[0] + 1) // 2
    want = (offsets + 1) // 2
    if want <= have:
        return table[have - want : have - 1 + want].contiguous()
    pad = want - have
    return torch.cat([table[:1].expand(pad, -1), table, table[-1:].expand(pad, -1)])


def from_axial_deeplab(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A csrhddlam/axial-deeplab ``AxialAttentionNet`` state dict → :class:`AxialResNet` keys.

    Their layout differs in four ways: ``layer{i}`` / ``hight_block`` / ``qkv_transform`` /
    ``downsample`` names; 1×1 convolutions with trailing unit axes; one ``relative`` table
    ``(2·d_out, 2m-1)`` per layer holding ``[r^q, r^k, r^v]`` rows, where the ``r^q`` and
    ``r^v`` columns are indexed by ``o - p`` but ``r^k`` by ``p - o`` (so the ``r^q``,
    ``r^v`` tables are reversed here, ours being indexed by ``p - o``); and ``bn_output``
    channels interleaved ``[c0·v, c0·r^v, c1·v, …]`` (ours are ``[v…, r^v…]``). Their
    ``flatten_index`` buffers are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(".flatten_index"):
            continue
        name = _THEIR_BLOCK.sub(lambda m: f"stages.{int(m.group(1)) - 1}.", key)
        name = name.replace(".hight_block.", ".height_block.").replace(".downsample.", ".shortcut.")
        name = name.replace(".qkv_transform.", ".qkv.")
        if name.endswith(".relative"):
            prefix = name[: -len("relative")]
            d_q = value.shape[0] // 4
            q, k, v = value.split([d_q, d_q, 2 * d_q], dim=0)  # (d, 2m-1) each
            out[prefix + "rel_q"] = q.T.flip(0).contiguous()
            out[prefix + "rel_k"] = k.T.contiguous()
            out[prefix + "rel_v"] = v.T.flip(0).contiguous()
            continue
        if ".bn_output." in name and value.ndim == 1 and value.numel() > 1:
            value = value.view(-1, 2).T.reshape(-1).contiguous()
        if value.ndim >= 3 and all(s == 1 for s in value.shape[2:]):
            value = value.reshape(value.shape[0], value.shape[1])
        out[name] = value
    return out
