"""ELASTIC: learned, instance-specific scale policies in ResNe(X)t bottlenecks.

Wang et al., CVPR 2019; Wang's JHU thesis (2021), ch. 2 and appendix A. A layer is

    F(x) = σ(Σ_i U_{r_i}(T_i(D_{r_i}(x))))                              (eq. 2.3)

with two branches here: ``r = 1`` (high resolution) and ``r = 2`` (low resolution). Each
branch is a bottleneck ``1×1 → 3×3 → 1×1`` with half the block's width and half its groups
(Table A.3), so the block keeps exactly the parameters of the plain block it replaces
(for ResNeXt; a ResNet block has one group, which cannot be halved, so its Elastic version
has a 3×3 conv of two groups' parameters). The branches' last 1×1 outputs are summed
before one shared batch norm, then the residual is added and ReLU applied.

* ``D`` (:func:`downsample`): 2×2 average pooling, stride 2; an odd side is first padded by
  one replicated row/column at the bottom/right, so the low-resolution side is ``⌈n/2⌉``.
* ``U`` (:func:`upsample`): bilinear ×2 (``align_corners=False``), cropped to the input size.

Multiply-adds: the high branch costs half the plain block, the low branch an eighth
(Table 2.1: ``Σ_i (n/r_i)² c k² / b_i`` with ``b = 2``), so 5/8 in all.

Elastic is applied to the stride-1 blocks of every stage but the last (the thesis: "all
blocks except stride-2 ones or high-level blocks operating at resolution 7", i.e. the
stages of fewer than 512 planes in ResNe(X)t-50).

Models (:data:`MODELS`): ``elastic_resnext50`` (32×4d, blocks rebalanced to [6, 8, 5, 3]
to match ResNeXt-50's FLOPs, Table A.3), ``selastic_resnext50`` (sELASTIC: the base
model's [3, 4, 6, 3]), ``elastic_resnet50`` (ResNet-50 widths, [6, 8, 5, 3]) and the
tiny seeded ``test_elastic``.

Scale policy (thesis §2.4.2, eq. 2.5): per image and Elastic block,
``S = mean(x_high) − mean(x_low)`` over the activations after each branch's 3×3
convolution, batch norm and ReLU; :func:`scale_policy_scores` returns them.

Published weights: :func:`convert_allenai_state_dict` maps allenai/elastic's ImageNet
checkpoints (``module.``-prefixed ``state_dict`` of their ``ResNext``) onto these models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

EXPANSION = 4
"""Output channels of a bottleneck per plane (ResNet/ResNeXt)."""


def downsample(x: torch.Tensor) -> torch.Tensor:
    """``D``: ``(B, C, H, W)`` → ``(B, C, ⌈H/2⌉, ⌈W/2⌉)`` by 2×2 average pooling.

    An odd side is padded by replicating its last row/column first, so every output
    value is the mean of four input values.
    """
    pad_h, pad_w = x.shape[-2] % 2, x.shape[-1] % 2
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
    return F.avg_pool2d(x, kernel_size=2, stride=2)


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``U``: ``(B, C, h, w)`` → bilinear ×2 (``align_corners=False``) cropped to ``size``."""
    up = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
    return up[..., : size[0], : size[1]]


class Branch(nn.Module):
    """``T_i``: ``1×1 → BN → ReLU → 3×3 (grouped) → BN → ReLU → 1×1`` (no final BN).

    ``(B, C_in, H, W)`` → ``(B, C_out, H / stride, W / stride)``. ``act2``'s output is the
    activation the scale-policy score averages.
    """

    def __init__(
        self,
        in_channels: int,
        width: int,
        out_channels: int,
        groups: int,
        stride: int = 1,
        dilation: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(
            width,
            width,
            3,
            stride=stride,
            padding=dilation,
            dilation=dilation,
            groups=groups,
            bias=False,
        )
        self.bn2 = nn.BatchNorm2d(width)
        self.act2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.conv3(x)


def bottleneck_width(planes: int, groups: int, base_width: int) -> int:
    """The 3×3 width of a ResNe(X)t bottleneck: ``⌊planes · base_width / 64⌋ · groups``."""
    return int(planes * base_width / 64) * groups


class Bottleneck(nn.Module):
    """A ResNe(X)t bottleneck, plain (one :class:`Branch`) or Elastic (``high`` + ``low``).

    Args:
        inplanes: input channels; planes: the stage's planes (output ``4 · planes``).
        groups, base_width: cardinality and per-group width (32, 4 for ResNeXt-50 32×4d).
        stride, dilation: of the 3×3 convolution (stride blocks are never Elastic).
        elastic: two half-width, half-groups branches at resolutions 1 and 1/2 (eq. 2.3).
        projection: the ``1×1`` conv + BN on the residual path (channel or stride change).
    """

    def __init__(
        self,
        inplanes: int,
        planes: int,
        groups: int = 1,
        base_width: int = 64,
        stride: int = 1,
        dilation: int = 1,
        elastic: bool = False,
        projection: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if elastic and stride != 1:
            raise ValueError("an Elastic block cannot have a stride (the thesis keeps those plain)")
        width = bottleneck_width(planes, groups, base_width)
        out = planes * EXPANSION
        self.elastic = elastic
        if elastic:
            if width % 2:
                raise ValueError(f"an Elastic block needs an even width, got {width}")
            half_groups = max(1, groups // 2)
            self.high = Branch(inplanes, width // 2, out, half_groups, dilation=dilation)
            self.low = Branch(inplanes, width // 2, out, half_groups, dilation=dilation)
        else:
            self.branch = Branch(inplanes, width, out, groups, stride, dilation)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = projection
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.elastic:
            out = self.high(x) + upsample(self.low(downsample(x)), x.shape[-2:])
        else:
            out = self.branch(x)
        out = self.bn3(out)
        identity = x if self.downsample is None else self.downsample(x)
        return self.act(out + identity)


@dataclass(frozen=True)
class ElasticConfig:
    """One ELASTIC ResNe(X)t.

    Attributes:
        layers: blocks per stage.
        groups, base_width: ResNeXt cardinality and per-group width (ResNet: 1, 64).
        planes: planes per stage (outputs are ``4 ·`` these).
        stem_width: channels of the 7×7 stem.
        elastic_stages: how many leading stages get Elastic stride-1 blocks (3: all but
            the last, the thesis' rule; 0: the plain base model).
        output_stride: 32 (classification layout) or 16 (the last stage's stride replaced
            by dilation 2, DeepLab style: what the encoder contract asks for).
    """

    layers: tuple[int, ...] = (6, 8, 5, 3)
    groups: int = 32
    base_width: int = 4
    planes: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: int = 64
    elastic_stages: int = 3
    output_stride: int = 16

    def validate(self) -> None:
        if len(self.layers) != len(self.planes) or not self.layers:
            raise ValueError(f"layers {self.layers} and planes {self.planes} must pair up")
        if self.output_stride not in (16, 32):
            raise ValueError(f"output_stride must be 16 or 32, got {self.output_stride}")
        if not 0 <= self.elastic_stages <= len(self.layers):
            raise ValueError(f"elastic_stages must be in 0..{len(self.layers)}")


MODELS: dict[str, ElasticConfig] = {
    "elastic_resnext50": ElasticConfig(layers=(6, 8, 5, 3)),
    "selastic_resnext50": ElasticConfig(layers=(3, 4, 6, 3)),
    "elastic_resnet50": ElasticConfig(layers=(6, 8, 5, 3), groups=1, base_width=64),
    "test_elastic": ElasticConfig(
        layers=(2, 2, 2, 1), groups=4, base_width=32, planes=(4, 8, 16, 32), stem_width=16
    ),
}
"""The registered architectures (Table A.3 for the ResNeXt-50 ones)."""


class ElasticResNet(nn.Module):
    """ResNe(X)t with Elastic bottlenecks: ``conv1/bn1`` stem, ``layer1..layer4`` stages.

    ``forward(x)`` maps ``(B, 3, H, W)`` to the last stage's ``(B, 4·planes[-1], H/os, W/os)``.
    No classifier head. The staged-backbone protocol of
    :mod:`hbird.encoders.conv_backbone`: ``stage_channels``, ``stage_strides``,
    :meth:`forward_stages`, and :meth:`convert_state_dict` for allenai/elastic's files.
    """

    def __init__(self, config: ElasticConfig) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.conv1 = nn.Conv2d(3, config.stem_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(config.stem_width)
        self.act = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes, stride_so_far, dilation = config.stem_width, 4, 1
        strides, channels = [], []
        for i, (blocks, planes) in enumerate(zip(config.layers, config.planes)):
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if stride == 2 and stride_so_far * 2 > config.output_stride:
                dilation, stride = dilation * stride, 1  # DeepLab: trade the stride for dilation
            stride_so_far *= stride
            nominal_stride = 1 if i == 0 else 2  # Elastic skips the stride block even when dilated
            elastic = i < config.elastic_stages
            layer = []
            for j in range(blocks):
                first = j == 0
                projection = None
                if first and (stride != 1 or inplanes != planes * EXPANSION):
                    projection = nn.Sequential(
                        nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=False),
                        nn.BatchNorm2d(planes * EXPANSION),
                    )
                layer.append(
                    Bottleneck(
                        inplanes,
                        planes,
                        config.groups,
                        config.base_width,
                        stride=stride if first else 1,
                        dilation=previous_dilation if first else dilation,
                        elastic=elastic and not (first and nominal_stride != 1),
                        projection=projection,
                    )
                )
                inplanes = planes * EXPANSION
            self.add_module(f"layer{i + 1}", nn.Sequential(*layer))
            strides.append(stride_so_far)
            channels.append(inplanes)
        self.stage_strides: tuple[int, ...] = tuple(strides)
        self.stage_channels: tuple[int, ...] = tuple(channels)
        self.embed_dim = inplanes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He-normal convolutions (the thesis' "normal He initialization"), unit BN scales
        except each block's last BN, which starts at zero so every residual block starts as
        the identity (as allenai/elastic's ResNeXt does)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)

    def stage_modules(self) -> list[nn.Sequential]:
        """``layer1``, ``layer2``, ... in order."""
        return [getattr(self, f"layer{i + 1}") for i in range(len(self.stage_strides))]

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` → ``(B, stem_width, H/4, W/4)``."""
        return self.maxpool(self.act(self.bn1(self.conv1(x))))

    def forward_stages(self, x: torch.Tensor, stages: Sequence[int]) -> list[torch.Tensor]:
        """``(B, 3, H, W)`` → the ``(B, C_i, H/s_i, W/s_i)`` outputs of ``stages`` (in that
        order), stopping after the deepest one asked for."""
        wanted = [i % len(self.stage_strides) for i in stages]
        outputs = {}
        x = self.stem(x)
        for i, stage in enumerate(self.stage_modules()[: max(wanted) + 1]):
            x = stage(x)
            outputs[i] = x
        return [outputs[i] for i in wanted]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_stages(x, [-1])[0]

    def convert_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> dict:
        """allenai/elastic's layout → this model's keys; its own layout passes unchanged."""
        if is_allenai_layout(state_dict):
            return convert_allenai_state_dict(state_dict, self)
        return dict(state_dict)

    def elastic_blocks(self) -> list[Bottleneck]:
        """The Elastic blocks in forward order (the rows of a scale-policy picture)."""
        return [m for m in self.modules() if isinstance(m, Bottleneck) and m.elastic]


def build_elastic(arch: str, seed: int | None = None, **overrides) -> ElasticResNet:
    """The architecture ``arch`` of :data:`MODELS` (fields overridden by ``overrides``).

    ``seed`` fixes the random initialisation without reading or advancing the global RNG.
    """
    if arch not in MODELS:
        raise ValueError(f"unknown ELASTIC model {arch!r}; choose one of {', '.join(MODELS)}")
    base = MODELS[arch]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    config = ElasticConfig(**{**base.__dict__, **fields})
    if seed is None:
        return ElasticResNet(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ElasticResNet(config)


# -- scale policy (thesis §2.4.2) ---------------------------------------------------------------


@torch.no_grad()
def scale_policy_scores(model: ElasticResNet, images: torch.Tensor) -> torch.Tensor:
    """Eq. 2.5 per image and Elastic block: ``(B, 3, H, W)`` → ``(B, L)``.

    ``S = mean_{h,w,c}(x_high) − mean_{h,w,c}(x_low)``, where ``x`` are the activations
    after each branch's 3×3 convolution, batch norm and ReLU. Run the model in eval mode
    for the thesis' "fixed batch normalizations".
    """
    blocks = model.elastic_blocks()
    if not blocks:
        raise ValueError("this model has no Elastic blocks (elastic_stages=0)")
    means: dict[int, torch.Tensor] = {}

    def hook(key: int):
        def record(_module, _inputs, output):
            means[key] = output.float().mean(dim=(1, 2, 3))

        return record

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.high.act2.register_forward_hook(hook(2 * i)))
        handles.append(block.low.act2.register_forward_hook(hook(2 * i + 1)))
    try:
        model(images)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack([means[2 * i] - means[2 * i + 1] for i in range(len(blocks))], dim=1)


# -- allenai/elastic checkpoints -------------------------------------------------------------

_ALLENAI_BLOCK = re.compile(r"^(layer\d+\.\d+)\.(conv[123]|bn[12])(_d)?\.(.+)$")


def is_allenai_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether the (prefix-stripped) keys are allenai/elastic's (``conv1_d`` low branches)."""
    return any(_ALLENAI_BLOCK.match(k) and "_d." in k for k in state_dict)


def convert_allenai_state_dict(
    state_dict: Mapping[str, torch.Tensor], model: ElasticResNet
) -> dict[str, torch.Tensor]:
    """allenai/elastic's ResNeXt keys → ``model``'s keys.

    Their every block has a full-resolution branch (``conv1``, ``bn1``, ``conv2``, ``bn2``,
    ``conv3``) and a second one with ``_d`` names (downsampled in Elastic blocks), each of
    half the width and half the groups, summed before ``bn3``. In this model's Elastic
    blocks they become ``high`` and ``low``; in its plain blocks (stride blocks, the last
    stage) the two halves are one branch: the 1×1-in and 3×3 weights and the BNs are
    stacked along the output channels (high first; the 3×3 groups stay block-diagonal),
    the 1×1-out weights along the input channels — the same function. ``downsample.*``
    and the stem keep their names; the classifier (``fc.*``) is dropped.
    """
    own = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    halves: dict[tuple[str, str, str], dict[bool, torch.Tensor]] = {}
    for key, value in state_dict.items():
        if key.startswith("fc."):
            continue
        m = _ALLENAI_BLOCK.match(key)
        if m is None:
            out[key] = value
            continue
        block, layer, low, param = m.group(1), m.group(2), m.group(3) is not None, m.group(4)
        if f"{block}.high.conv1.weight" in own:
            out[f"{block}.{'low' if low else 'high'}.{layer}.{param}"] = value
        else:
            halves.setdefault((block, layer, param), {})[low] = value
    for (block, layer, param), pair in halves.items():
        if len(pair) != 2:
            missing = "_d" if True not in pair else ""
            raise ValueError(f"{block}.{layer}{missing}.{param} is missing from the checkpoint")
        high, low = pair[False], pair[True]
        if param == "num_batches_tracked":
            merged = high
        elif layer == "conv3":
            merged = torch.cat([high, low], dim=1)
        else:
            merged = torch.cat([high, low], dim=0)
        out[f"{block}.branch.{layer}.{param}"] = merged
    return out
