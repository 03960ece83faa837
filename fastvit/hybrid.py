"""Hybrid ViT (paper, Sec. 3.1): the input sequence is a CNN feature map cut into 1 x 1 patches, timm-compatible.

The CNN is the BiT ResNet the paper pairs with ViT, in the layout timm's ``vision_transformer_hybrid.py`` builds:
weight-standardised convolutions with TensorFlow 'SAME' padding, GroupNorm(32) + ReLU, a 7x7/2 stem with 3x3/2 max
pooling, and non-pre-activation bottleneck stages (R50: (3, 4, 9) for stride 16, (3, 4, 6, 3) for stride 32; R26:
(2, 2, 2, 2); timm's R+ViT-Ti: the stem alone, with 8 x 8 patches).
Parameter names match timm (``patch_embed.backbone.stem.conv.weight``, ``...stages.i.blocks.j.conv1.weight``, ...),
so timm's hybrid weights load unchanged (``fastvit.convert.hybrid_backbone_from_npz`` reads the original JAX
layout). timm's four hybrids of its own design, which have no pretrained weights, use a ResNet-D instead
(``fastvit.resnet_d``), and MobileCLIP-B's image encoder a small convolutional stem (``ConvStem``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit.model import (EmbedOptions, VisionTransformer, checked_image, embed_patches, grid_size_for,
                           resample_projection_)
from fastvit.registry import register_model
from fastvit.resample import _pair
from fastvit.resnet_d import ResNetD, init_resnet_d, init_resnet_weights, resnet_d_stage
from fastvit.surgery import keep_original_forward

__all__ = ["Bottleneck", "ConvNormAct", "ConvStem", "GroupNormAct", "HybridEmbed", "ResNetStem", "ResNetV2",
           "StdConv2dSame"]


def _same_padding(size, kernel, stride):
    """TensorFlow 'SAME' padding (before, after) for one spatial dim: output ceil(size / stride), extra at the end."""
    total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _pad_same(x, kernel, stride, value=0.0):
    """Pad ``x`` for a 'SAME' op; returns (input, padding the op itself applies) so symmetric cases avoid a copy."""
    (top, bottom), (left, right) = (_same_padding(n, k, s) for n, k, s in zip(x.shape[-2:], kernel, stride))
    if top == bottom and left == right:
        return x, (top, left)
    return F.pad(x, (left, right, top, bottom), value=value), (0, 0)


def conv2d_same(x, weight, stride):
    """Bias-free convolution with 'SAME' padding."""
    x, padding = _pad_same(x, weight.shape[-2:], stride)
    return F.conv2d(x, weight, None, stride, padding)


def max_pool2d_same(x, kernel_size, stride):
    """Max pooling with 'SAME' padding (padding never wins the max)."""
    x, padding = _pad_same(x, kernel_size, stride, value=-math.inf)
    return F.max_pool2d(x, kernel_size, stride, padding)


# the padding depends on the input's size: torch.fx keeps these two as leaf calls
torch.fx.wrap("conv2d_same")
torch.fx.wrap("max_pool2d_same")


class StdConv2dSame(nn.Conv2d):
    """Bias-free convolution whose filters are standardised (zero mean, unit variance per output channel) at every
    call, with 'SAME' padding. BiT's weight standardisation; eps 1e-8 as in timm's hybrid backbone."""

    def __init__(self, in_chs, out_chs, kernel_size, stride=1, eps=1e-8):
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x):
        # standardising each filter over its fan-in is a LayerNorm of the flattened filters, one fused kernel
        flat = self.weight.reshape(self.out_channels, -1)
        weight = F.layer_norm(flat, flat.shape[1:], eps=self.eps).reshape_as(self.weight)
        return conv2d_same(x, weight, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm over 32 groups (eps 1e-5), followed by ReLU when ``apply_act``."""

    def __init__(self, num_channels, apply_act=True, num_groups=32, eps=1e-5):
        super().__init__(num_groups, num_channels, eps=eps)
        self.apply_act = apply_act

    def forward(self, x):
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.apply_act else x


class MaxPool2dSame(nn.Module):
    """3x3/2 max pooling with 'SAME' padding (padding never wins the max)."""

    def __init__(self, kernel_size=3, stride=2):
        super().__init__()
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)

    def forward(self, x):
        return max_pool2d_same(x, self.kernel_size, self.stride)


class Downsample(nn.Module):
    """Projection shortcut: strided 1x1 convolution + GroupNorm (no activation)."""

    def __init__(self, in_chs, out_chs, stride):
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x):
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck: ReLU(branch(x) + shortcut(x)) with branch = 1x1 conv, GN, ReLU, 3x3 conv
    (stride s), GN, ReLU, 1x1 conv, GN; the shortcut projects (1x1 conv stride s, GN) when the shape changes."""

    def __init__(self, in_chs, out_chs, stride=1):
        super().__init__()
        mid = out_chs // 4
        self.downsample = Downsample(in_chs, out_chs, stride) if stride != 1 or in_chs != out_chs else None
        self.conv1 = StdConv2dSame(in_chs, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, apply_act=False)

    def forward(self, x):
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm2(self.conv2(self.norm1(self.conv1(x))))
        return F.relu(self.norm3(self.conv3(x)) + shortcut)


class ResNetStage(nn.Module):
    """``depth`` bottlenecks; the first one changes width and applies the stage's stride."""

    def __init__(self, in_chs, out_chs, stride, depth):
        super().__init__()
        self.blocks = nn.Sequential(*[Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1)
                                      for i in range(depth)])

    def forward(self, x):
        return self.blocks(x)


class ResNetStem(nn.Sequential):
    """The BiT ResNet's stem, 7x7/2 conv, GroupNorm + ReLU, 3x3/2 max pool: (B, C, H, W) -> (B, stem_chs, H / 4,
    W / 4). ``ResNetV2`` starts with it; alone it is the backbone of timm's R+ViT-Ti hybrids (``layers=()``).
    Its 'SAME' paddings give ceil(H / 4) rows for any H (``feature_rounding``, which HybridEmbed's grid follows)."""

    feature_rounding = "ceil"

    def __init__(self, in_chans=3, stem_chs=64):
        super().__init__(OrderedDict([
            ("conv", StdConv2dSame(in_chans, stem_chs, 7, stride=2)),
            ("norm", GroupNormAct(stem_chs)),
            ("pool", MaxPool2dSame(3, 2)),
        ]))
        self.in_chans, self.num_features, self.reduction = in_chans, stem_chs, 4


class ResNetV2(nn.Module):
    """The hybrids' BiT ResNet backbone: image (B, C, H, W) -> feature map (B, num_features, H / r, W / r).

    ``layers`` gives the bottleneck count per stage; stage i has 256 * 2^i output channels and stride 2 except the
    first, so r = ``reduction`` = 4 * 2^(len(layers) - 1). Inputs whose size is a multiple of r map exactly to H / r,
    others to ceil(H / r) (``feature_rounding``: every strided op pads 'SAME').
    """

    feature_rounding = "ceil"

    def __init__(self, layers=(3, 4, 9), in_chans=3, stem_chs=64):
        super().__init__()
        if not 1 <= len(layers) <= 4 or any(int(d) < 1 for d in layers):
            raise ValueError(f"layers must be 1 to 4 positive stage depths, e.g. (3, 4, 9), got {layers!r}")
        self.in_chans = in_chans
        self.layers = tuple(int(d) for d in layers)
        self.stem = ResNetStem(in_chans, stem_chs)
        self.stages = nn.Sequential()
        chs = stem_chs
        for i, depth in enumerate(self.layers):
            self.stages.add_module(str(i), ResNetStage(chs, 256 * 2 ** i, 1 if i == 0 else 2, depth))
            chs = 256 * 2 ** i
        self.num_features = chs
        self.reduction = 4 * 2 ** (len(self.layers) - 1)
        self.init_weights()

    def init_weights(self):
        init_resnet_weights(self, (m.norm3 for m in self.modules() if isinstance(m, Bottleneck)))

    def forward(self, x):
        return self.stages(self.stem(x))


class ConvNormAct(nn.Module):
    """A convolution (no padding), then BatchNorm + GELU, or nothing after it for the bare last layer of a
    :class:`ConvStem` (which has a bias instead), as timm's ConvNormAct there."""

    def __init__(self, in_chs, out_chs, kernel_size, stride, apply_norm=True):
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, bias=not apply_norm)
        self.bn = nn.BatchNorm2d(out_chs) if apply_norm else nn.Identity()
        self.apply_act = apply_norm

    def forward(self, x):
        x = self.bn(self.conv(x))
        return F.gelu(x) if self.apply_act else x


class ConvStem(nn.Sequential):
    """MobileCLIP's convolutional stem (timm's ``vit_base_mci_224``): layers of stride = kernel size, each conv, BN and
    GELU but the last, a bare conv whose output is the tokens (its hybrid has no projection after the backbone):
    (B, C, H, W) -> (B, channels[-1], H / r, W / r), r the product of the strides; unpadded, it drops what is left
    of any other size (``feature_rounding``)."""

    feature_rounding = "floor"

    def __init__(self, in_chans=3, channels=(192, 192, 768), strides=(4, 2, 2)):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels and strides must have the same length (>= 1), got {channels!r} and "
                             f"{strides!r}")
        chs = in_chans
        for i, (out_chs, stride) in enumerate(zip(channels, strides)):
            self.add_module(str(i), ConvNormAct(chs, out_chs, stride, stride, apply_norm=i < len(channels) - 1))
            chs = out_chs
        self.in_chans, self.num_features, self.reduction = in_chans, chs, math.prod(strides)


# the patch grid of a dynamic size's feature map is worked out from a node of the graph under torch.fx: a leaf here
torch.fx.wrap("grid_size_for")


class HybridEmbed(EmbedOptions, nn.Module):
    """The embed_layer of a hybrid ViT: backbone feature map -> P x P patches (P = 1 in the paper) projected to D.

    Follows ``PatchEmbed``'s protocol (timm's keywords and options, ``grid_size``, ``check_input``, ``forward``
    returning the patch tokens, ``embed`` adding the optional position table and class token, ``set_input_size``)
    so ``VisionTransformer(embed_layer=partial(HybridEmbed, backbone=...))`` needs nothing else. ``patch_size`` is
    the projection's, over the feature map; ``grid_size`` is the feature grid divided by it. ``backbone`` must expose
    ``in_chans``, ``num_features`` and ``reduction``.
    ``proj=False`` (MobileCLIP's): the features are the tokens, with no projection (embed_dim = num_features).
    """

    def __init__(self, backbone, img_size=224, patch_size=1, in_chans=3, embed_dim=768, bias=True, proj=True,
                 flatten=True, output_fmt=None, strict_img_size=True, dynamic_img_pad=False, dynamic_img_size=False):
        super().__init__()
        if dynamic_img_pad and _pair(patch_size) != (1, 1):
            raise ValueError(f"dynamic_img_pad is not supported for a hybrid with patch_size {patch_size} over its "
                             f"feature map (with 1 every feature map is whole patches)")
        self._set_options(flatten, output_fmt, strict_img_size, dynamic_img_pad, dynamic_img_size)
        if not isinstance(backbone, nn.Module):
            raise TypeError(f"backbone must be an nn.Module (e.g. fastvit.hybrid.ResNetV2), got "
                            f"{type(backbone).__name__}")
        missing = [a for a in ("in_chans", "num_features", "reduction") if not hasattr(backbone, a)]
        if missing:
            raise TypeError(f"backbone {type(backbone).__name__} lacks the attributes {missing}: a hybrid backbone "
                            f"must expose in_chans, num_features and reduction (its total stride)")
        if backbone.in_chans != in_chans:
            raise ValueError(f"in_chans={in_chans} does not match the backbone's in_chans={backbone.in_chans}")
        self.backbone = backbone
        self.backend = "auto"
        self.feature_dim = backbone.num_features
        self.feature_ratio = _pair(backbone.reduction)
        if proj:
            self.proj = nn.Conv2d(self.feature_dim, embed_dim, _pair(patch_size), stride=_pair(patch_size), bias=bias)
        elif self.feature_dim != embed_dim or _pair(patch_size) != (1, 1):
            raise ValueError(f"proj=False takes the backbone's features as the tokens: it needs embed_dim equal to "
                             f"the backbone's {self.feature_dim} features and patch_size 1, got {embed_dim} and "
                             f"{patch_size}")
        else:
            self.proj = nn.Identity()
        self._set_sizes(img_size, patch_size)

    @property
    def in_chans(self) -> int:
        """Channels of an input image: the backbone's."""
        return self.backbone.in_chans

    @property
    def token_stride(self):
        """Image pixels per token along (H, W): the backbone's reduction times the patch size."""
        return tuple(r * p for r, p in zip(self.feature_ratio, self.patch_size))

    @property
    def feature_rounding(self) -> str:
        """How an image's size maps to the backbone's feature map: as its ``feature_rounding`` says ("ceil" for
        'SAME' padding, "floor" for unpadded strides: any image size then works, as in timm, whose HybridEmbed runs
        the backbone to find out), else sizes a multiple of its reduction only ("whole")."""
        return getattr(self.backbone, "feature_rounding", "whole")

    def _set_sizes(self, img_size, patch_size):
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.feature_size = grid_size_for(self.img_size, self.feature_ratio, "the backbone reduction",
                                          rounding=self.feature_rounding)
        # the built size in whole patches, as timm asks (a dynamic size drops what is left, as its convolution does)
        self.grid_size = grid_size_for(self.feature_size, self.patch_size, "patch_size",
                                       "the backbone's feature map")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None):
        """Change the expected image size (feature grid = size / reduction / patch) and/or the projection's patch
        size (weights resampled as PatchEmbed does)."""
        if not isinstance(self.proj, nn.Identity):
            resample_projection_(self.proj, patch_size)
        elif patch_size is not None and _pair(patch_size) != (1, 1):
            raise ValueError(f"this hybrid has no projection (proj=False): patch_size must stay 1, got {patch_size}")
        self._set_sizes(img_size or self.img_size, patch_size or self.patch_size)

    def check_input(self, x):
        """Validate an image batch as PatchEmbed does, against the backbone's reduction with its rounding, then
        whole patches of the projection: (x, its token grid (gh, gw))."""
        x, features = checked_image(x, self.in_chans, self.img_size, self.feature_ratio, self.dynamic_img_size,
                                    self.feature_rounding, "the backbone reduction")
        # whole patches of the feature map (the projection's stride-P convolution drops the rest, as timm's does)
        return x, grid_size_for(features, self.patch_size, "patch_size", "the backbone's feature map", "floor")

    def forward(self, x):
        """(B, C, H, W) image -> (B, N, D) tokens of its backbone features, or the layout of ``flatten`` /
        ``output_fmt``."""
        features = self.backbone(x)
        tokens = embed_patches(self.proj, features, self.patch_size, None, None, False, self.backend)
        if self._token_format() == "NLC":
            return tokens
        (ph, pw), (h, w) = self.patch_size, features.shape[-2:]
        return self.format_tokens(tokens, h // ph, w // pw)

    def embed(self, x, pos_embed=None, cls_token=None, no_embed_class=False):
        """(B, C, H, W) image -> backbone features -> (B, [1 +] N, D) tokens, as ``PatchEmbed.embed``."""
        return embed_patches(self.proj, self.backbone(x), self.patch_size, pos_embed, cls_token, no_embed_class,
                             self.backend)


keep_original_forward(HybridEmbed)


# ---- registry: timm's hybrid names (vision_transformer_hybrid.py); heads come from the pretrained configs -----
def _bit(layers):
    """in_chans -> the BiT ResNet with ``layers`` (the stem alone for ())."""
    return lambda in_chans: ResNetV2(layers, in_chans=in_chans) if layers else ResNetStem(in_chans)


def _resnet_d(layers, dropped_stage=0):
    """in_chans -> the ResNet-D with ``layers``, drawing its weights as timm's does: timm builds the whole ResNet
    (a 4th stage of ``dropped_stage`` bottlenecks where the hybrid keeps 3, and a 1000-class head) before its
    feature wrapper keeps what the hybrid uses, so those are built here too, in timm's order, then thrown away:
    a seed gives timm's weights."""
    def build(in_chans):
        backbone = ResNetD(layers, in_chans=in_chans, init=False)
        stages = len(layers)
        dropped = resnet_d_stage(stages, dropped_stage, backbone.num_features) if dropped_stage else None
        nn.Linear(backbone.num_features * (2 if dropped_stage else 1), 1000)
        init_resnet_d(backbone)
        if dropped is not None:
            init_resnet_d(dropped)
        return backbone
    return build


def _hybrid_builder(backbone, embed_dim, depth, num_heads, img_size, patch_size=1, mlp_ratio=4.0, proj=True,
                    **vit_kwargs):
    def build(**kwargs):
        cfg = dict(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                   mlp_ratio=mlp_ratio, **vit_kwargs,
                   embed_layer=partial(HybridEmbed, backbone=backbone(kwargs.get("in_chans", 3)), proj=proj))
        return VisionTransformer(**{**cfg, **kwargs})
    return build


for _name, _args in {
    "vit_base_r50_s16_224": (_bit((3, 4, 9)), 768, 12, 12, 224),
    "vit_base_r50_s16_384": (_bit((3, 4, 9)), 768, 12, 12, 384),
    "vit_large_r50_s32_224": (_bit((3, 4, 6, 3)), 1024, 24, 16, 224),
    "vit_large_r50_s32_384": (_bit((3, 4, 6, 3)), 1024, 24, 16, 384),
    "vit_small_r26_s32_224": (_bit((2, 2, 2, 2)), 384, 12, 6, 224),
    "vit_small_r26_s32_384": (_bit((2, 2, 2, 2)), 384, 12, 6, 384),
    "vit_base_r26_s32_224": (_bit((2, 2, 2, 2)), 768, 12, 12, 224),
    "vit_tiny_r_s16_p8_224": (_bit(()), 192, 12, 3, 224, 8),
    "vit_tiny_r_s16_p8_384": (_bit(()), 192, 12, 3, 384, 8),
    # timm's own hybrids (no pretrained weights): ResNet-D backbones, the "small" ones 8 blocks of width 768
    "vit_small_resnet26d_224": (_resnet_d((2, 2, 2, 2)), 768, 8, 8, 224, 1, 3.0),
    "vit_small_resnet50d_s16_224": (_resnet_d((3, 4, 6), dropped_stage=3), 768, 8, 8, 224, 1, 3.0),
    "vit_base_resnet26d_224": (_resnet_d((2, 2, 2, 2)), 768, 12, 12, 224),
    "vit_base_resnet50d_224": (_resnet_d((3, 4, 6, 3)), 768, 12, 12, 224),
}.items():
    register_model(_name, _hybrid_builder(*_args), module="vision_transformer_hybrid")
# MobileCLIP-B's image encoder: the stem's last conv makes the tokens (stride 16 in all), no class row in E_pos
register_model("vit_base_mci_224", _hybrid_builder(lambda in_chans: ConvStem(in_chans), 768, 12, 12, 224, proj=False,
                                                   no_embed_class=True), module="vision_transformer_hybrid")
