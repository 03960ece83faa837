"""ResNet-D (He et al., "Bag of Tricks", 2019), the backbone of timm's four untrained hybrids
(``vit_small_resnet26d_224``, ``vit_small_resnet50d_s16_224``, ``vit_base_resnet26d_224``, ``vit_base_resnet50d_224``).

It differs from the paper's BiT ResNet (``fastvit.hybrid.ResNetV2``) in three places: plain convolutions with zero
padding and BatchNorm instead of weight standardisation, 'SAME' padding and GroupNorm; a deep stem (three 3x3
convolutions, 32-32-64 channels, instead of one 7x7); and shortcuts that average-pool before their 1x1 projection
(the "D" tweak: a strided 1x1 convolution reads only a quarter of its input). Parameter names are those of timm's
``resnet26d`` / ``resnet50d`` built with ``features_only``, so timm's hybrid state_dicts load unchanged.
"""
from __future__ import annotations

from collections import OrderedDict

import torch.nn as nn

__all__ = ["ResNetD", "ResNetDBottleneck", "init_resnet_d", "init_resnet_weights", "resnet_d_stage"]

EXPANSION = 4  # a bottleneck's output channels over its 3x3 convolution's


def _conv_bn(in_chs, out_chs, kernel_size, stride=1):
    """(convolution without bias, padding k // 2; BatchNorm) as a pair of modules."""
    return (nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs))


def init_resnet_weights(model, last_norms):
    """timm's init of its ResNets (this one and the BiT ResNet of ``fastvit.hybrid``): He-normal (fan-out)
    convolutions, norm layers 1 / 0, and ``last_norms`` (each residual branch's last norm) zeroed, so that every block
    starts as the identity on its shortcut."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for norm in last_norms:
        nn.init.zeros_(norm.weight)


class ResNetDBottleneck(nn.Module):
    """ReLU(branch(x) + shortcut(x)), branch = 1x1 conv, BN, ReLU, 3x3 conv (stride s), BN, ReLU, 1x1 conv, BN; the
    shortcut, where the shape changes, is AvgPool(2, s) (stride 2 only), 1x1 conv, BN. Modules in timm's order,
    with its placeholders (``drop_block``, ``aa``: identities in these hybrids), so that hooks find the same names
    and ``parameters()`` comes in the same order (an optimizer's state is matched to parameters by position)."""

    def __init__(self, in_chs, width, stride=1):
        super().__init__()
        out_chs = width * EXPANSION
        self.conv1, self.bn1 = _conv_bn(in_chs, width, 1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2, self.bn2 = _conv_bn(width, width, 3, stride)
        self.drop_block = nn.Identity()
        self.act2 = nn.ReLU(inplace=True)
        self.aa = nn.Identity()
        self.conv3, self.bn3 = _conv_bn(width, out_chs, 1)
        self.act3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_chs != out_chs:
            pool = (nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False) if stride != 1
                    else nn.Identity())
            self.downsample = nn.Sequential(pool, *_conv_bn(in_chs, out_chs, 1))

    def forward(self, x):
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.aa(self.act2(self.drop_block(self.bn2(self.conv2(x)))))
        x = self.bn3(self.conv3(x))
        if self.downsample is not None:  # after the branch, as timm's: hooks fire in its order
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


def init_resnet_d(model):
    """timm's ResNet init (:func:`init_resnet_weights`) for a ResNet-D or part of one: every bottleneck starts as
    the identity on its shortcut."""
    init_resnet_weights(model, (m.bn3 for m in model.modules() if isinstance(m, ResNetDBottleneck)))


def resnet_d_stage(i, depth, in_chs):
    """Stage ``i`` (from 0) of ``depth`` bottlenecks on ``in_chs`` channels: width 64 * 2^i, stride 2 but in the
    first stage."""
    width = 64 * 2 ** i
    blocks = [ResNetDBottleneck(in_chs if j == 0 else width * EXPANSION, width, (1 if i == 0 else 2) if j == 0 else 1)
              for j in range(depth)]
    return nn.Sequential(OrderedDict((str(j), b) for j, b in enumerate(blocks)))


class ResNetD(nn.Module):
    """Image (B, C, H, W) -> the last stage's feature map (B, num_features, H / r, W / r).

    ``layers`` gives the bottlenecks per stage (resnet26d: (2, 2, 2, 2); resnet50d: (3, 4, 6, 3), or its first three
    stages for stride 16); stage i has 256 * 2^i output channels and stride 2 except the first, after a stride-4
    stem, so r = ``reduction`` = 4 * 2^(len(layers) - 1). ``init=False`` leaves the layers as built (PyTorch's
    defaults) for a later :func:`init_resnet_d`. It has no ``init_weights``: as timm's feature wrapper around its
    ResNet, a ViT's ``init_weights`` leaves it alone (or, with ``needs_reset``, resets each layer). Any other size
    gives ceil(H / r) rows (``feature_rounding``: each strided op pads k // 2, its pools round up).
    """

    feature_rounding = "ceil"

    def __init__(self, layers=(3, 4, 6, 3), in_chans=3, stem_width=32, init=True):
        super().__init__()
        if not 1 <= len(layers) <= 4 or any(int(d) < 1 for d in layers):
            raise ValueError(f"layers must be 1 to 4 positive stage depths, e.g. (3, 4, 6, 3), got {layers!r}")
        self.in_chans = in_chans
        self.layers = tuple(int(d) for d in layers)
        conv_a, bn_a = _conv_bn(in_chans, stem_width, 3, 2)
        conv_b, bn_b = _conv_bn(stem_width, stem_width, 3)
        chs = 2 * stem_width
        conv_c, bn_c = _conv_bn(stem_width, chs, 3)
        # timm's numbering: the ReLUs sit at 2 and 5; then bn1, act1, maxpool (its module and parameter order)
        self.conv1 = nn.Sequential(conv_a, bn_a, nn.ReLU(inplace=True), conv_b, bn_b, nn.ReLU(inplace=True), conv_c)
        self.bn1 = bn_c
        self.act1 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, padding=1)
        for i, depth in enumerate(self.layers):
            self.add_module(f"layer{i + 1}", resnet_d_stage(i, depth, chs))
            chs = 64 * 2 ** i * EXPANSION
        self.num_features = chs
        self.reduction = 4 * 2 ** (len(self.layers) - 1)
        if init:  # else the caller calls init_resnet_d (fastvit.hybrid, to draw as timm's build does)
            init_resnet_d(self)

    def forward(self, x):
        x = self.maxpool(self.act1(self.bn1(self.conv1(x))))
        for i in range(len(self.layers)):
            x = getattr(self, f"layer{i + 1}")(x)
        return x
