"""Vision Transformer ("An Image is Worth 16x16 Words", Dosovitskiy et al. 2021), timm-compatible.

    z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos          E in R^{(P^2 C) x D}, E_pos in R^{(N+1) x D}
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}                          l = 1..L
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L^0)

Names, constructor keywords and state_dict layout follow timm's ``vision_transformer.py``, so timm weights load
unchanged. Patch embedding, residual add + LayerNorm, bias + GELU and attention go through ``fastvit.ops``, the one
place that chooses between Triton kernels and torch math; every module here only carries its ``backend`` name.

Every module calls its submodules as timm's does, so hooks, replaced layers and adapters (PEFT LoRA, a quantised
Linear) act exactly as on timm. A fused op stands in for a group of submodules only while each of them is the plain
torch module it was built as, with no hooks (``fastvit.surgery``, checked per call).
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fastvit import ops
from fastvit.attention_pool import AttentionPoolLatent
from fastvit.drop import DropPath, drop_path_or_identity
from fastvit.glu_mlp import GluMlp, SwiGLU
from fastvit.patch_dropout import PatchDropout
from fastvit.weight_init import lecun_normal_, trunc_normal_
from fastvit.registry import register_model, timm_archs
from fastvit.kernels._launch import autocast_enabled, plain_tensors
from fastvit.kernels.bias_gelu import gelu_ref
from fastvit.kernels.flash_attention import num_relative_positions, relative_bias_dense
from fastvit.resample import (_pair, resample_abs_pos_embed, resample_patch_embed, resample_pos_embed_1d,
                              resample_rel_pos_table)
from fastvit.surgery import (all_pass_through, all_unedited, call, fusable_layer_norm, fx_tracing,
                             keep_original_forward, layer_norm, linear, output_may_fuse, passes_through,
                             runs_unmodified, unedited, weight_and_bias)

POS_EMBEDS = ("learn", "learn_2d", "none", "rel")
POS_EMBED_AT = ("stem", "every_layer", "every_layer_shared")
# residual_dtype choices, by name (as flags and config.json give them) or as torch dtypes
RESIDUAL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                   "autocast": "autocast", "model": None}
GLOBAL_POOLS = ("token", "avg", "avgmax", "max", "map", "")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation of OpenAI's CLIP weights (timm's 'quick_gelu')."""

    def forward(self, x):
        return gelu_ref(x, "sigmoid")


# timm's names for the activations and norms of its ViT configs (``timm.layers.get_act_layer`` / ``get_norm_layer``)
ACT_LAYERS = {"gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"), "quick_gelu": QuickGELU,
              "silu": nn.SiLU, "swish": nn.SiLU, "relu": nn.ReLU}
NORM_LAYERS = {"layernorm": partial(nn.LayerNorm, eps=1e-6), "rmsnorm": partial(nn.RMSNorm, eps=1e-6)}
# gated MLPs by name (timm passes the classes; ``swiglu_packed`` is timm's SwiGLUPacked, DINOv2-giant's)
MLP_LAYERS = {"swiglu": SwiGLU, "swiglu_packed": partial(GluMlp, act_layer=nn.SiLU, gate_last=False), "glu": GluMlp}


def act_layer_of(act_layer):
    """The activation factory for ``act_layer``: None (the exact GELU of the paper), a timm name, or a module class
    or factory called with no arguments. nn.GELU (exact or tanh) and QuickGELU run inside the fused ops; any other
    runs as itself."""
    if act_layer is None:
        return nn.GELU
    if isinstance(act_layer, str):
        return ACT_LAYERS[_check_choice("act_layer", act_layer, tuple(ACT_LAYERS))]
    return act_layer


WEIGHT_INITS = ("", "jax", "jax_nlhb", "moco", "reset")  # timm's init modes (VisionTransformer.init_weights)


def _children_first(module, prefix=""):
    """(path, submodule) for every submodule below ``module``, each after its own submodules (depth first, as timm's
    ``named_apply`` visits them)."""
    for name, child in module.named_children():
        path = f"{prefix}.{name}" if prefix else name
        yield from _children_first(child, path)
        yield path, child


def _init_linear(m, name, mode, head_bias):
    """One Linear by init ``mode`` (see VisionTransformer.init_weights); ``name`` is its module path."""
    if not mode:
        trunc_normal_(m.weight, std=0.02)
    elif mode.startswith("jax") and name.startswith("head"):
        nn.init.zeros_(m.weight)
        nn.init.constant_(m.bias, head_bias)
        return
    elif mode == "moco" and "qkv" in name:  # q, k and v each Xavier-uniform on its own (D x D) block
        bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
        nn.init.uniform_(m.weight, -bound, bound)
    else:
        nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        if mode.startswith("jax") and "mlp" in name:
            nn.init.normal_(m.bias, std=1e-6)
        else:
            nn.init.zeros_(m.bias)


def mlp_layer_of(mlp_layer):
    """The MLP factory for ``mlp_layer``: None (the paper's :class:`Mlp`), a name of ``MLP_LAYERS`` or a module
    factory taking timm's Block keywords (in_features, hidden_features, act_layer, norm_layer, bias, drop)."""
    if isinstance(mlp_layer, str):
        return MLP_LAYERS[_check_choice("mlp_layer", mlp_layer, tuple(MLP_LAYERS))]
    return mlp_layer


def norm_layer_of(norm_layer):
    """The norm factory ``dim -> module`` for ``norm_layer``: None (LayerNorm, eps 1e-6, as timm), a timm name
    ('layernorm', 'rmsnorm'), or a class or factory such as ``partial(nn.LayerNorm, eps=1e-5)``. Only an exact
    affine nn.LayerNorm fuses with the residual add and the projection after it."""
    if norm_layer is None:
        return NORM_LAYERS["layernorm"]
    if isinstance(norm_layer, str):
        name = norm_layer.replace("_", "").lower()
        return NORM_LAYERS[_check_choice("norm_layer", name, tuple(NORM_LAYERS))]
    return norm_layer


def feature_take_indices(num_blocks, indices=None):
    """(absolute block indices, the largest) for ``indices``: None all, an int n the last n, a list in its own
    order with negatives counted from the end (timm's rule)."""
    if indices is None:
        indices = num_blocks
    if isinstance(indices, int):
        if not 0 < indices <= num_blocks:
            raise ValueError(f"last-n indices must be in 1..{num_blocks}, got {indices}")
        take = list(range(num_blocks - indices, num_blocks))
    else:
        take = [num_blocks + i if i < 0 else i for i in indices]
        bad = [i for i, t in zip(indices, take) if not 0 <= t < num_blocks]
        if bad or not take:
            raise ValueError(f"block indices must be in {-num_blocks}..{num_blocks - 1}, got {list(indices)}")
    return take, max(take)


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


class ImageSizeError(ValueError, AssertionError):
    """An image size the model cannot take: a ValueError that is also the AssertionError of timm's size checks,
    so code written against timm catches it."""


class ImageChannelsError(ValueError, RuntimeError):
    """An image batch of the wrong shape: also the RuntimeError timm's convolution raises."""


class ImageDtypeError(TypeError, RuntimeError):
    """An image batch that is not floating point: also the RuntimeError timm's convolution raises."""


ROUNDINGS = ("whole", "floor", "ceil")


def grid_size_for(size, stride, stride_name="patch_size", size_name="img_size", rounding="whole"):
    """The token grid (size / stride per axis) of an image embedded at ``stride`` pixels per token. ``rounding``:
    "whole", the stride must divide the size (the ValueError names both as ``size_name`` and ``stride_name``);
    "floor", the rows and columns past the last whole patch are dropped, as a strided convolution (and timm's ViT)
    drops them (SigLIP so400m/14 at 384 px: 27 x 27 patches); "ceil", a partial one counts (a hybrid whose backbone
    pads 'SAME' and so rounds its feature map up, as BiT's and ResNet-D's do)."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "whole" and (size[0] % stride[0] or size[1] % stride[1]):
        raise ImageSizeError(f"{size_name} {size} must be divisible by {stride_name} {stride}")
    if rounding == "ceil":
        return -(-size[0] // stride[0]), -(-size[1] // stride[1])
    if size[0] < stride[0] or size[1] < stride[1]:
        raise ImageSizeError(f"{size_name} {size} is smaller than {stride_name} {stride}")
    return size[0] // stride[0], size[1] // stride[1]


def image_grid_size(x, in_chans, img_size, stride, dynamic_img_size, rounding="whole", stride_name="the patch size"):
    """Validate an image batch for an embedding of the given pixel ``stride`` per token; return the token grid
    (``rounding``: see :func:`grid_size_for`)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor image batch, got {type(x).__name__}")
    if x.ndim != 4:
        raise ImageChannelsError(f"expected a 4D (B, C, H, W) image batch, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ImageDtypeError(f"expected a floating-point image batch, got dtype {x.dtype}")
    if x.shape[1] != in_chans:
        raise ImageChannelsError(f"expected {in_chans} input channels, got {x.shape[1]} (shape {tuple(x.shape)})")
    size = tuple(x.shape[-2:])
    if not dynamic_img_size and size != img_size:
        raise ImageSizeError(f"expected image size {img_size}, got {size}; pass dynamic_img_size=True or call "
                             f"set_input_size(img_size={size})")
    return grid_size_for(size, stride, stride_name, "image size", rounding)


def _validated_image(x, in_chans, img_size, stride, rounding, stride_name):
    """x itself after ``image_grid_size``'s checks at a fixed size: a torch.fx leaf, so traced graphs keep them."""
    image_grid_size(x, in_chans, img_size, stride, False, rounding, stride_name)
    return x


def _dynamic_image(x, in_chans, img_size, stride, rounding, stride_name):
    """(x, its token grid) after ``image_grid_size``'s checks at any size: a torch.fx leaf, so a dynamic-size model
    traces too, its grid a node of the graph (read by leaves: the position table's resampling, reshapes)."""
    return x, image_grid_size(x, in_chans, img_size, stride, True, rounding, stride_name)


torch.fx.wrap("_validated_image")
torch.fx.wrap("_dynamic_image")
# the position tables' resampling reads the grid in Python: a leaf under torch.fx (a dynamic size's grid is a node)
torch.fx.wrap("resample_abs_pos_embed")
torch.fx.wrap("resample_pos_embed_1d")


def checked_image(x, in_chans, img_size, stride, dynamic_img_size, rounding="whole", stride_name="the patch size"):
    """(x, its token grid), validated, in torch.fx leaves, so the model traces at a fixed or a dynamic size.
    ``rounding``: see :func:`grid_size_for`."""
    if dynamic_img_size:
        return _dynamic_image(x, in_chans, img_size, stride, rounding, stride_name)
    return (_validated_image(x, in_chans, img_size, stride, rounding, stride_name),
            grid_size_for(img_size, stride, rounding=rounding))


def residual_stream(h, dtype, param):
    """``h`` in the residual stream's dtype under autocast ('autocast': the autocast dtype; None: the dtype of the
    model's parameter ``param``, as timm's stream has it), else unchanged; a torch.fx leaf, so a traced model follows
    the autocast state it runs under and the dtype it was cast to."""
    device = h.device.type
    if autocast_enabled(device):
        if dtype is None:
            dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        return h.to(torch.get_autocast_dtype(device) if dtype == "autocast" else dtype)
    return h


torch.fx.wrap("residual_stream")


def embed_patches(proj, x, patch_size, pos_embed, cls_token, no_embed_class, backend):
    """z_0 from the projection ``proj`` (a stride-P conv): one fused kernel when it is a plain Conv2d of that
    geometry, otherwise ``proj(x)`` followed by the class token and position rows in torch."""
    if (runs_unmodified(proj, nn.Conv2d) and tuple(proj.kernel_size) == tuple(proj.stride) == tuple(patch_size)
            and proj.padding == (0, 0) and proj.dilation == (1, 1) and proj.groups == 1):
        weight = proj._parameters["weight"]
        if isinstance(x, torch.Tensor) and x.dtype != weight.dtype and not autocast_enabled(x.device.type):
            # nn.Conv2d's rule, which timm's model follows: no silent cast of the image to the model's dtype
            raise RuntimeError(f"Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same: cast "
                               f"the images or the model, or run under torch.autocast")
        return ops.patch_embed(x, *weight_and_bias(proj), patch_size, pos_embed, cls_token, no_embed_class,
                               backend=backend)
    return ops.add_class_and_position(proj(x).flatten(2).transpose(1, 2), pos_embed, cls_token, no_embed_class)


def _pad_to_patches(x, patch_size):
    """An image batch zero-padded on the bottom and right to whole patches (timm's ``dynamic_img_pad``); anything
    else unchanged, for the checks after to name. A torch.fx leaf: it reads the image's shape."""
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        return x
    (ph, pw), (h, w) = patch_size, x.shape[-2:]
    return F.pad(x, (0, (pw - w % pw) % pw, 0, (ph - h % ph) % ph))


torch.fx.wrap("_pad_to_patches")


def resample_projection_(proj, patch_size):
    """Give a patch projection (a stride-P conv) a new patch size in place, resampling its weights (FlexiViT)."""
    if patch_size is None or _pair(patch_size) == tuple(proj.kernel_size):
        return
    weight = resample_patch_embed(proj.weight.detach(), _pair(patch_size))
    proj.weight = nn.Parameter(weight, requires_grad=proj.weight.requires_grad)
    proj.kernel_size = proj.stride = _pair(patch_size)


OUTPUT_FORMATS = ("NCHW", "NHWC", "NCL", "NLC")


class EmbedOptions:
    """timm's patch-embedding options, for PatchEmbed and ``fastvit.hybrid.HybridEmbed``: ``strict_img_size`` (only
    the built image size), ``flatten`` ((B, N, D) tokens) or ``output_fmt`` (one of OUTPUT_FORMATS; timm's Format
    enum is a str too), ``dynamic_img_pad``. They are plain attributes, read at every call, so timm's recipe of
    setting them on a built model (strict_img_size False, output_fmt NHWC) works. ``dynamic_img_size`` is fastvit's
    one switch for the pair timm's ViT passes for dynamic sizes: strict_img_size=False, output_fmt='NHWC'."""

    def _set_options(self, flatten, output_fmt, strict_img_size, dynamic_img_pad, dynamic_img_size):
        if dynamic_img_size:
            strict_img_size, output_fmt = False, "NHWC"
        self.strict_img_size, self.dynamic_img_pad = strict_img_size, dynamic_img_pad
        self.flatten, self.output_fmt = (flatten, "NCHW") if output_fmt is None else (False, output_fmt)
        self._token_format()  # a bad output_fmt fails here, not at the first forward

    @property
    def dynamic_img_size(self) -> bool:
        """Whether images of any size are taken (``strict_img_size`` off)."""
        return not self.strict_img_size

    @dynamic_img_size.setter
    def dynamic_img_size(self, value):
        """On: timm's pair for dynamic sizes, any size and (B, gh, gw, D) tokens; off: the built size only, and
        (B, N, D) tokens where the layout was that pair's."""
        if value:
            self.strict_img_size, self.flatten, self.output_fmt = False, False, "NHWC"
            return
        self.strict_img_size = True
        if self._token_format() == "NHWC":
            self.flatten, self.output_fmt = True, "NCHW"

    def _token_format(self) -> str:
        """The layout of ``forward``'s output: NLC where ``flatten``, else ``output_fmt``'s."""
        fmt = "NLC" if self.flatten else getattr(self.output_fmt, "value", self.output_fmt)
        if fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt must be one of {OUTPUT_FORMATS}, got {self.output_fmt!r}")
        return fmt

    def format_tokens(self, tokens, height, width):
        """(B, N, D) tokens of an image of ``height`` x ``width`` tokens -> ``forward``'s layout (NCHW and NCL
        contiguous, as timm's convolution gives them)."""
        fmt = self._token_format()
        if fmt in ("NLC", "NCL"):
            return tokens if fmt == "NLC" else tokens.transpose(1, 2).contiguous()
        tokens = tokens.unflatten(1, (height, width))
        return tokens if fmt == "NHWC" else tokens.permute(0, 3, 1, 2).contiguous()

    def token_rows(self, out):
        """``forward``'s output -> (B, N, D) tokens (the model's layout)."""
        fmt = self._token_format()
        if fmt in ("NLC", "NCL"):
            return out if fmt == "NLC" else out.transpose(1, 2)
        return out.flatten(1, 2) if fmt == "NHWC" else out.flatten(2).transpose(1, 2)


class PatchEmbed(EmbedOptions, nn.Module):
    """Cut the image into P x P patches and project each flattened patch to D: x_p^i E (a stride-P convolution).

    ``forward`` returns the patch tokens as timm's does: (B, N, D), or another layout by timm's options
    (:class:`EmbedOptions`; (B, gh, gw, D) with ``dynamic_img_size``, which keeps the grid of an image of any size);
    ``embed`` also prepends the class token and adds the position table, because the fused kernel writes the whole
    z_0 in one pass. ``norm`` is timm's placeholder for a norm on the patch tokens (nn.Identity; a module put there
    runs before the class token and positions). Arguments in timm's order.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, norm_layer=None, flatten=True,
                 output_fmt=None, bias=True, strict_img_size=True, dynamic_img_pad=False, dynamic_img_size=False):
        super().__init__()
        self._set_options(flatten, output_fmt, strict_img_size, dynamic_img_pad, dynamic_img_size)
        self.backend = "auto"
        self._in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, embed_dim, _pair(patch_size), stride=_pair(patch_size), bias=bias)
        self.norm = nn.Identity() if norm_layer is None else norm_layer(embed_dim)
        self._set_sizes(img_size, patch_size)

    @property
    def in_chans(self) -> int:
        """Channels of an input image: the projection's (a ``proj`` replaced by the user may take others; one
        that does not say, such as a wrapper, the built value)."""
        return getattr(self.proj, "in_channels", self._in_chans)

    def _set_sizes(self, img_size, patch_size):
        self.img_size, self.patch_size = _pair(img_size), _pair(patch_size)
        self.grid_size = grid_size_for(self.img_size, self.patch_size, rounding="floor")
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None):
        """Change the expected image size and/or patch size; the projection is resampled for a new patch size."""
        resample_projection_(self.proj, patch_size)
        self._set_sizes(img_size or self.img_size, patch_size or self.patch_size)

    def feat_ratio(self, as_scalar=True):
        """The token stride in pixels: the largest side of the patch, or both (timm's PatchEmbed interface)."""
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size):
        """The patch grid of an ``img_size`` image, partial patches counted with ``dynamic_img_pad`` (timm's
        PatchEmbed interface)."""
        (h, w), (ph, pw) = img_size, self.patch_size
        return (-(-h // ph), -(-w // pw)) if self.dynamic_img_pad else (h // ph, w // pw)

    def check_input(self, x):
        """Validate an image batch: (x, its patch grid (gh, gw)); with ``dynamic_img_pad`` x is first zero-padded
        on the bottom and right to whole patches, as timm's (which checks a fixed size before padding: an image of
        another size is refused, not padded up to it)."""
        if self.dynamic_img_pad:
            if not self.dynamic_img_size:
                checked_image(x, self.in_chans, self.img_size, self.patch_size, False, "floor")
            x = _pad_to_patches(x, self.patch_size)
        # a dynamic size is whole patches, as timm asks (or padded to them first: dynamic_img_pad)
        return checked_image(x, self.in_chans, self.img_size, self.patch_size, self.dynamic_img_size,
                             "whole" if self.dynamic_img_size else "floor")

    def forward(self, x):
        """(B, C, H, W) -> (B, N, D) patch tokens, or the layout of ``flatten`` / ``output_fmt``; with
        ``dynamic_img_pad`` the image is first zero-padded to whole patches, as timm's."""
        if self.dynamic_img_pad:
            x = _pad_to_patches(x, self.patch_size)
        tokens = embed_patches(self.proj, x, self.patch_size, None, None, False, self.backend)
        if self._token_format() != "NLC":  # the grid read only where the layout needs it (no dead fx nodes)
            tokens = self.format_tokens(tokens, x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        return call(self.norm, tokens)  # after the layout, as timm's

    def embed(self, x, pos_embed=None, cls_token=None, no_embed_class=False):
        """(B, C, H, W) -> (B, [1 +] N, D); see ``fastvit.ops.patch_embed`` for the optional tables."""
        if not passes_through(self.norm):
            return ops.add_class_and_position(self.token_rows(self(x)), pos_embed, cls_token, no_embed_class)
        return embed_patches(self.proj, x, self.patch_size, pos_embed, cls_token, no_embed_class, self.backend)


def attention_layers(attn, dim, qkv_bias, qk_norm, scale_norm, norm_layer, attn_drop, proj_drop, proj_bias):
    """timm's attention layers on ``attn`` (whose ``head_dim`` is set), in its order: qkv, then its options as
    nn.Identity placeholders when off (norms of q and k per head, of the heads' output before the projection), the
    attention dropout, proj; and the scale and timm's fused-attention switch."""
    attn.scale = attn.head_dim ** -0.5
    attn.fused_attn = ops.timm_fused_attn()
    attn.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    attn.q_norm = norm_layer(attn.head_dim) if qk_norm else nn.Identity()
    attn.k_norm = norm_layer(attn.head_dim) if qk_norm else nn.Identity()
    attn.attn_drop = nn.Dropout(attn_drop)
    attn.norm = norm_layer(dim) if scale_norm else nn.Identity()
    attn.proj = nn.Linear(dim, dim, bias=proj_bias)
    attn.proj_drop = nn.Dropout(proj_drop)


class Attention(nn.Module):
    """MSA(z) = [SA_1(z); ...; SA_k(z)] U_msa with SA(z) = softmax(q k^T / sqrt(D_h) + B_rel) v, [q, k, v] = z U_qkv.

    With ``rel_pos_grid`` the bias B_rel comes from a learned per-head table over 2D patch offsets (Swin's and
    BEiT's form, which our attention kernel takes: a scalar per head and offset; the paper's relative ablation,
    Appendix D.4, instead attends with 1-D offset embeddings as keys, a bias that depends on the query); otherwise
    there is no bias. As in timm, ``fused_attn = False`` (or an edited
    ``attn_drop``) computes the attention matrix explicitly: softmax, then ``attn_drop`` on it, so that hooks there
    and timm's ``AttentionExtract`` see the maps; its default follows timm's switch (:func:`fastvit.ops.timm_fused_attn`).
    """

    def __init__(self, dim, num_heads=8, qkv_bias=True, attn_drop=0.0, proj_drop=0.0, rel_pos_grid=None,
                 class_token=True, qk_norm=False, scale_norm=False, norm_layer=None, proj_bias=True):
        super().__init__()
        norm_layer = norm_layer_of(norm_layer)
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim  # timm's attributes, read by timm's Attention.forward where users graft it on
        self.gate = None
        self.backend = "auto"
        attention_layers(self, dim, qkv_bias, qk_norm, scale_norm, norm_layer, attn_drop, proj_drop, proj_bias)
        self.rel_pos_grid = None if rel_pos_grid is None else _pair(rel_pos_grid)
        self.rel_pos_table = None
        if rel_pos_grid is not None:
            self.rel_pos_table = nn.Parameter(torch.zeros(num_heads, num_relative_positions(rel_pos_grid,
                                                                                            class_token)))

    def set_rel_pos_grid(self, grid_size):
        """Resample the relative-position table to a new patch grid (a frozen table stays frozen)."""
        table = resample_rel_pos_table(self.rel_pos_table.detach(), self.rel_pos_grid, grid_size)
        self.rel_pos_table = nn.Parameter(table, requires_grad=self.rel_pos_table.requires_grad)
        self.rel_pos_grid = _pair(grid_size)

    def forward(self, x, grid_size=None, attn_mask=None, is_causal=False):
        return self.attend(self.qkv(x), grid_size, attn_mask, is_causal)

    def attend(self, qkv, grid_size=None, attn_mask=None, is_causal=False):
        """Everything after the qkv projection (the block fuses that projection with its LayerNorm).
        ``attn_mask`` / ``is_causal``: timm's (and SDPA's) masks, see :func:`fastvit.ops.attention`."""
        B, N, _ = qkv.shape
        rel_bias = None
        if self.rel_pos_table is not None:
            grid_size = self.rel_pos_grid if grid_size is None else grid_size
            rel_bias = resample_rel_pos_table(self.rel_pos_table, self.rel_pos_grid, grid_size)
        modules = self._modules
        attn_drop = modules["attn_drop"]
        # timm's fused path never calls attn_drop, so a global module hook (an activation logger) is no reason to
        # compute the maps; one on attn_drop itself is (it asks for them: timm's AttentionExtract)
        fused = self.fused_attn and unedited(attn_drop, nn.Dropout)
        dropout_p = attn_drop.p if self.training else 0.0
        if (fused and attn_mask is None and not is_causal and passes_through(modules["q_norm"])
                and passes_through(modules["k_norm"])):
            # q, k, v stay packed in qkv: the attention's backward returns qkv's gradient in one piece
            out = ops.attention_qkv(qkv, self.num_heads, rel_bias=rel_bias, grid_size=grid_size,
                                    dropout_p=dropout_p, backend=self.backend)
            return self._project(out)
        q, k, v = self._split_heads(qkv)
        q, k = call(modules["q_norm"], q), call(modules["k_norm"], k)
        if fused:
            out = ops.attention(q, k, v, rel_bias=rel_bias, grid_size=grid_size, dropout_p=dropout_p,
                                backend=self.backend, attn_mask=attn_mask, is_causal=is_causal)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if rel_bias is not None:
                attn = attn + relative_bias_dense(rel_bias, grid_size, N).to(attn.dtype)
            attn = ops.masked_scores(attn, attn_mask, is_causal)
            out = attn_drop(attn.softmax(dim=-1)) @ v
        return self._project(out)

    def attend_class_token(self, qkv):
        """:meth:`attend`'s output at the class token's row alone, (B, 1, D): each head's first query against every
        key (the last block of a model whose head reads nothing else: :func:`class_token_suffices`)."""
        q, k, v = self._split_heads(qkv)
        modules = self._modules
        q, k = call(modules["q_norm"], q[:, :, :1]), call(modules["k_norm"], k)
        return self._project(ops.attention(q, k, v, backend=self.backend))

    def _split_heads(self, qkv):
        """(B, N, 3D) -> (B, N, 3, heads, D_h) -> q, k, v: three (B, heads, N, D_h) strided views of one buffer, no
        copies."""
        B, N, _ = qkv.shape
        return qkv.reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)

    def _project(self, out):
        """(B, heads, N, D_h) heads -> norm, proj, proj_drop on (B, N, D)."""
        B, heads, N, head_dim = out.shape
        modules = self._modules
        out = call(modules["norm"], out.transpose(1, 2).reshape(B, N, heads * head_dim))
        return call(modules["proj_drop"], linear(modules["proj"], out))


# timm's attn_layer choices, by name ('' and 'attn': the paper's MSA); fastvit.diff_attention registers 'diff'
ATTN_LAYERS = {"": Attention, "attn": Attention}


def block_attention(attn_layer, dim, num_heads, qkv_bias, attn_drop, proj_drop, rel_pos_grid, class_token,
                    qk_norm, scale_norm, norm_layer, proj_bias, depth):
    """A block's attention for ``attn_layer``: :class:`Attention` for None, a name of ``ATTN_LAYERS`` or timm's class
    of that name (ours in its place), or a class taking timm's keywords (and ``depth``, the block's index, if it is
    a DiffAttention, as timm passes it)."""
    if isinstance(attn_layer, str):
        cls = ATTN_LAYERS[_check_choice("attn_layer", attn_layer, tuple(ATTN_LAYERS))]
    elif attn_layer is None:
        cls = Attention
    elif getattr(attn_layer, "__module__", "").startswith("timm."):
        ours = {c.__name__: c for c in ATTN_LAYERS.values()}
        cls = ours.get(attn_layer.__name__, attn_layer)
    else:
        cls = attn_layer
    if cls is Attention:
        return Attention(dim, num_heads, qkv_bias, attn_drop, proj_drop, rel_pos_grid, class_token, qk_norm,
                         scale_norm, norm_layer, proj_bias)
    if rel_pos_grid is not None:
        raise ValueError(f"pos_embed='rel' is fastvit's Attention's: attn_layer {cls.__name__} has no relative "
                         f"positions")
    # the block's index, as timm passes it: to differential attention (timm's, ours, their subclasses) only
    base = cls.func if isinstance(cls, partial) else cls
    extra = {"depth": depth} if any(c.__name__ == "DiffAttention" for c in getattr(base, "__mro__", ())) else {}
    return cls(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, scale_norm=scale_norm,
               proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, **extra)


class Mlp(nn.Module):
    """MLP(z) = GELU(z W_1 + b_1) W_2 + b_2, exact (erf) GELU; the GELU is fused with fc2 (recomputed in its
    backward, so the hidden activation is kept once, as fc1's output). So are timm's two approximations of it
    (``act_layer`` 'gelu_tanh', SigLIP's, and 'quick_gelu', CLIP's); another activation runs as its own module
    between the two Linears."""

    def __init__(self, in_features, hidden_features, drop=0.0, scale_norm=False, act_layer=None, norm_layer=None,
                 bias=True):
        super().__init__()
        self.backend = "auto"
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = act_layer_of(act_layer)()
        self.drop1 = nn.Dropout(drop)
        # timm's option, an nn.Identity placeholder when off: a norm of the activation before fc2
        self.norm = norm_layer_of(norm_layer)(hidden_features) if scale_norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features, bias=bias)
        self.drop2 = nn.Dropout(drop)

    @property
    def fused_activation(self) -> bool:
        """Whether the GELU may run inside a fused op (act an unmodified nn.GELU or QuickGELU)."""
        return self.gelu_approximate is not None

    @property
    def gelu_approximate(self):
        """The fused ops' name of the activation (``ops.bias_gelu``'s ``approximate``: nn.GELU's own, "sigmoid" for
        QuickGELU), or None where it does not fuse (another or an edited module)."""
        act = self._modules["act"]
        if runs_unmodified(act, nn.GELU):
            return act.approximate
        return "sigmoid" if runs_unmodified(act, QuickGELU) else None

    def forward(self, x):
        return self.activate(self.fc1(x))

    def activate(self, h):
        """GELU(h) W_2 + b_2 from fc1's output h (the block may fuse fc1 with its LayerNorm).

        fc2 recomputes the GELU in backward, unless something must see the activation: dropout, a norm, or an edited
        drop1 / fc2 (then the GELU runs alone); an edited act runs as it is.
        """
        approximate = self.fc2_gelu
        if approximate is not None:
            return self.drop2(ops.bias_gelu_linear(h, None, self.fc2.weight, self.fc2.bias, self.backend, approximate))
        approximate = self.gelu_approximate
        if approximate is None:
            return self.drop2(self.fc2(call(self.norm, self.drop1(self.act(h)))))
        hidden = ops.bias_gelu(h, None, self.backend, approximate)
        return self.drop2(self.fc2(call(self.norm, self.drop1(hidden))))

    @property
    def fc2_gelu(self):
        """The GELU (:attr:`gelu_approximate`) where it may run inside fc2's op: a fused activation, and nothing
        between them that must see it (active dropout, a norm, an edited drop1 or fc2); else None."""
        m = self._modules
        drop1 = m["drop1"]
        # drop1's own mode, not the Mlp's: MC dropout turns single Dropouts back on in an eval-mode model; its type
        # first, since a module put in its place (nn.Identity) has no p
        if (not runs_unmodified(drop1, nn.Dropout) or (drop1.training and drop1.p > 0)
                or not runs_unmodified(m["norm"], nn.Identity) or not runs_unmodified(m["fc2"], nn.Linear)):
            return None
        return self.gelu_approximate


class LayerScale(nn.Module):
    """Per-channel scaling of a residual branch (timm's ``init_values``; off in the paper's ViT)."""

    def __init__(self, dim, init_values=1e-5):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def reset_parameters(self):
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x):
        return x * self.gamma


# the layers of the paper's Block, each of which computes token by token
_TOKENWISE = frozenset((nn.Linear, nn.LayerNorm, nn.GELU, QuickGELU, nn.Identity, nn.Dropout, DropPath, LayerScale,
                        Mlp, Attention))


def class_token_suffices(block) -> bool:
    """Whether the last block may compute its output at the class token's row alone, for a head that reads nothing
    else (``VisionTransformer.forward`` with global_pool='token', in a training step): its MLP, projection and
    query then run on 1 row of N + 1 (9 of a block's 12 D^2 multiply-adds per token; a B/16 step does 1/16 fewer).
    Only for a Block that runs unmodified whose layers are all ours, token by token and unmodified (a hook, a
    replaced or wrapped layer sees the rows timm's block gives it), without a relative-position table (its bias
    indexes the N x N scores) or an element-wise dropout that is on (its mask would be drawn for another shape;
    DropPath draws one per sample)."""
    if not output_may_fuse(block, Block):
        return False
    for module in block.modules():
        kind = type(module)
        if module is block:
            continue
        if (kind not in _TOKENWISE or not unedited(module, kind)
                or (kind is nn.Dropout and module.training and module.p > 0)
                or (kind is Attention and module.rel_pos_table is not None)):
            return False
    return True


def grid_keyword(attn, grid_size):
    """The keyword arguments a block or attention of ours is called with: the patch grid where ``attn`` (the
    block's attention) has a relative-position table, the grid's only user, else none. Called on the tokens alone,
    as timm's are, a module's pre-hooks and a subclass's ``forward(x)`` see timm's arguments."""
    return {"grid_size": grid_size} if getattr(attn, "rel_pos_table", None) is not None else {}


def attention_keywords(attn, grid_size, attn_mask, is_causal):
    """The keywords a block calls its attention module with: the grid (:func:`grid_keyword`) and, as timm's Block
    always passes them, ``attn_mask`` / ``is_causal`` (None / False without a mask, so hooks with kwargs see timm's);
    a replacement whose forward takes neither gets them only with a mask."""
    keywords = grid_keyword(attn, grid_size)
    if attn_mask is not None or is_causal or _takes_masks(attn.__dict__.get("forward", type(attn).forward)):
        keywords.update(attn_mask=attn_mask, is_causal=is_causal)
    return keywords


@functools.lru_cache(maxsize=256)  # bounded: a forward patched on an instance is a key that holds its module
def _takes_masks(forward) -> bool:
    params = inspect.signature(forward).parameters.values()
    names = {p.name for p in params}
    return {"attn_mask", "is_causal"} <= names or any(p.kind is p.VAR_KEYWORD for p in params)


def mask_keywords(attn_mask, is_causal):
    """timm's mask keywords for a call into a module that may be the user's: none when there is no mask, so a
    replacement written without them still runs unmasked."""
    return {"attn_mask": attn_mask, "is_causal": is_causal} if attn_mask is not None or is_causal else {}


def _block_mlp(dim, mlp_ratio, proj_drop, scale_mlp_norm, norm_layer, act_layer, mlp_layer, proj_bias):
    """A block's MLP: the paper's :class:`Mlp`, or ``mlp_layer`` (a gated one) with timm's keywords."""
    if mlp_layer is None:
        return Mlp(dim, int(dim * mlp_ratio), proj_drop, scale_mlp_norm, act_layer, norm_layer, proj_bias)
    return mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer_of(act_layer),
                     norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias, drop=proj_drop)


class Block(nn.Module):
    """Pre-LN encoder block: z' = MSA(LN(z)) + z, then z_out = MLP(LN(z')) + z'. ``attn_layer`` /
    ``depth``: :func:`block_attention`."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, rel_pos_grid=None, class_token=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, norm_layer=None, act_layer=None, mlp_layer=None,
                 proj_bias=True, attn_layer=None, depth=0):
        super().__init__()
        self.backend = "auto"
        norm_layer, mlp_layer = norm_layer_of(norm_layer), mlp_layer_of(mlp_layer)
        self.norm1 = norm_layer(dim)
        self.attn = block_attention(attn_layer, dim, num_heads, qkv_bias, attn_drop, proj_drop, rel_pos_grid,
                                    class_token, qk_norm, scale_attn_norm, norm_layer, proj_bias, depth)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = _block_mlp(dim, mlp_ratio, proj_drop, scale_mlp_norm, norm_layer, act_layer, mlp_layer, proj_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = drop_path_or_identity(drop_path)

    def forward(self, x, grid_size=None, attn_mask=None, is_causal=False):
        h, residual = self.forward_pair(x, None, grid_size, attn_mask, is_causal)
        return residual + h

    def forward_pair(self, h, residual, grid_size=None, attn_mask=None, is_causal=False, class_token_only=False):
        """The block on z = h + residual (residual None: z = h), returning (MLP branch, z') so that z_out = sum.

        Keeping the sum unevaluated lets each LayerNorm fuse the preceding residual add, also across blocks, and
        each LayerNorm runs together with the projection after it (qkv, fc1) so its output is never saved. Where
        the user edited a submodule of a branch, that branch calls its modules one by one instead.
        ``class_token_only`` (for :func:`class_token_suffices`) returns both at the class token's row alone: keys
        and values come from every token, the query, the projection and the MLP run on that row only.
        """
        if (not class_token_only and attn_mask is None and not is_causal
                and ops.block_inference_applies(h, residual, self.backend)):
            parts = self._plain_parts(h.dtype if residual is None else torch.promote_types(h.dtype, residual.dtype))
            if parts is not None:
                return ops.block_inference(h, residual, *parts)
        m = self._modules  # submodules read once per call (weight_and_bias says why)
        norm1, attn, norm2, mlp = m["norm1"], m["attn"], m["norm2"], m["mlp"]
        if (fusable_layer_norm(norm1) and runs_unmodified(attn, Attention) and attn.fused_attn
                and runs_unmodified(attn._modules["qkv"], nn.Linear)):
            qkv, residual = ops.add_layer_norm_linear(h, residual, *weight_and_bias(norm1),
                                                      *weight_and_bias(attn._modules["qkv"]), norm1.eps,
                                                      backend=self.backend)
            h = (attn.attend_class_token(qkv) if class_token_only
                 else attn.attend(qkv, grid_size, attn_mask, is_causal))
            del qkv  # (B, N, 3D): freed before the MLP, as timm's Attention frees it on return
        else:
            residual = h if residual is None else h + residual
            h = attn(norm1(residual), **attention_keywords(attn, grid_size, attn_mask, is_causal))
        if class_token_only:
            h, residual = h[:, :1], residual[:, :1]
        h = call(m["drop_path1"], call(m["ls1"], h))
        if (fusable_layer_norm(norm2) and runs_unmodified(mlp, Mlp)
                and runs_unmodified(mlp._modules["fc1"], nn.Linear)):
            fc1, fc2 = mlp._modules["fc1"], mlp._modules["fc2"]
            approximate = mlp.fc2_gelu
            if approximate is not None:
                h, residual = ops.layer_norm_mlp(h, residual, *weight_and_bias(norm2), *weight_and_bias(fc1),
                                                 *weight_and_bias(fc2), norm2.eps, backend=self.backend,
                                                 approximate=approximate)
                h = call(mlp._modules["drop2"], h)
            else:
                hidden, residual = ops.add_layer_norm_linear(h, residual, *weight_and_bias(norm2),
                                                             *weight_and_bias(fc1), norm2.eps, backend=self.backend)
                h = mlp.activate(hidden)
        else:
            residual = residual + h
            h = mlp(norm2(residual))
        return call(m["drop_path2"], call(m["ls2"], h)), residual

    def _plain_parts(self, dtype):
        """``ops.block_inference``'s arguments after z: (norm1, qkv, proj, norm2, fc1, fc2, heads, GELU), where the
        ops' fused path would run every part of this block (the checks of :meth:`forward_pair`, ``attend``,
        ``_project`` and ``Mlp.fc2_gelu``) and reach their plain CPU branches for a residual sum z of ``dtype``: every
        submodule the plain module it was built as (``surgery.runs_unmodified``: no hooks, patches or wrappers) with
        plain tensors for each norm's weight and bias, both in fp32 or both in ``dtype`` (as F.layer_norm takes
        them), the attention's own methods and backend as built, no relative-position bias, both dropouts before a
        GEMM off, and every other dropout, drop-path, LayerScale and extra norm passing its input through; else
        None."""
        m = self._modules
        attn, mlp = m["attn"], m["mlp"]
        d = attn.__dict__
        if not (all_unedited((attn, mlp), (Attention, Mlp)) and attn.fused_attn and attn.rel_pos_table is None
                and attn.backend in ("torch", self.backend) and "attend" not in d and "_project" not in d
                and Attention.attend is _ATTEND and Attention._project is _PROJECT):
            return None
        a, p = attn._modules, mlp._modules
        norm1, norm2, act, attn_drop, drop1 = m["norm1"], m["norm2"], p["act"], a["attn_drop"], p["drop1"]
        linears = a["qkv"], a["proj"], p["fc1"], p["fc2"]
        if not (all_unedited((act, attn_drop, drop1, p["norm"], *linears),
                             (nn.GELU, nn.Dropout, nn.Dropout, nn.Identity, nn.Linear, nn.Linear, nn.Linear, nn.Linear))
                and (not attn.training or attn_drop.p == 0) and (not drop1.training or drop1.p == 0)
                and fusable_layer_norm(norm1) and fusable_layer_norm(norm2)
                and all_pass_through((a["q_norm"], a["k_norm"], a["norm"], a["proj_drop"], m["ls1"], m["drop_path1"],
                                      p["drop2"], m["ls2"], m["drop_path2"]))):
            return None
        qkv, proj, fc1, fc2 = map(weight_and_bias, linears)
        norms = (*weight_and_bias(norm1), *weight_and_bias(norm2))
        # a quantised weight (a tensor subclass) runs the ops; so does a norm in another dtype, which they cast
        if not (plain_tensors((*norms, *qkv, *proj, *fc1, *fc2))
                and all(w.dtype == b.dtype and w.dtype in (torch.float32, dtype)
                        for w, b in (norms[:2], norms[2:]))):
            return None
        return (*norms[:2], norm1.eps), qkv, proj, (*norms[2:], norm2.eps), fc1, fc2, attn.num_heads, act.approximate


_ATTEND, _PROJECT = Attention.attend, Attention._project  # as defined, for Block._plain_parts's patch check


class ResPostBlock(nn.Module):
    """Residual post-norm block (timm's ``ResPostBlock``; Swin V2's res-post-norm): z' = z + LN(MSA(z)), then
    z_out = z' + LN(MLP(z')). Each norm closes its branch, so it sees no residual sum and no LayerNorm fuses here;
    ``init_values`` starts both norms' weights at that value, each branch near zero (what LayerScale does in
    :class:`Block`). Takes Block's arguments."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, rel_pos_grid=None, class_token=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, norm_layer=None, act_layer=None, mlp_layer=None,
                 proj_bias=True, attn_layer=None, depth=0):
        super().__init__()
        self.init_values = init_values
        norm_layer, mlp_layer = norm_layer_of(norm_layer), mlp_layer_of(mlp_layer)
        self.attn = block_attention(attn_layer, dim, num_heads, qkv_bias, attn_drop, proj_drop, rel_pos_grid,
                                    class_token, qk_norm, scale_attn_norm, norm_layer, proj_bias, depth)
        self.norm1 = norm_layer(dim)
        self.drop_path1 = drop_path_or_identity(drop_path)
        self.mlp = _block_mlp(dim, mlp_ratio, proj_drop, scale_mlp_norm, norm_layer, act_layer, mlp_layer, proj_bias)
        self.norm2 = norm_layer(dim)
        self.drop_path2 = drop_path_or_identity(drop_path)

    def init_weights(self):
        if self.init_values is not None:
            nn.init.constant_(self.norm1.weight, self.init_values)
            nn.init.constant_(self.norm2.weight, self.init_values)

    def forward(self, x, grid_size=None, attn_mask=None, is_causal=False):
        m = self._modules
        x = x + call(m["drop_path1"], m["norm1"](m["attn"](x, **attention_keywords(m["attn"], grid_size, attn_mask,
                                                                                   is_causal))))
        return x + call(m["drop_path2"], m["norm2"](m["mlp"](x)))


BLOCK_FNS = {"Block": Block, "ResPostBlock": ResPostBlock}  # timm's block_fn classes, by name


def block_fn_of(block_fn):
    """The block class for ``block_fn``: None (the paper's pre-LN :class:`Block`), a name of ``BLOCK_FNS`` or timm's
    class of that name (ours takes its place: the same parameters, and our arguments; also inside a
    ``functools.partial``, how timm sets ``num_parallel``, ``fuse_out_proj`` or ``dual_lambda``), or a class taking
    Block's arguments."""
    if block_fn is None:
        return Block
    if isinstance(block_fn, partial):
        return partial(block_fn_of(block_fn.func), *block_fn.args, **block_fn.keywords)
    name = getattr(block_fn, "__name__", None)
    if getattr(block_fn, "__module__", "") == "timm.models.vision_transformer" and name in BLOCK_FNS:
        return BLOCK_FNS[name]
    if isinstance(block_fn, str):
        return BLOCK_FNS[_check_choice("block_fn", block_fn, tuple(BLOCK_FNS))]
    return block_fn


def placed(init):
    """A module's ``__init__`` that also takes timm's ``device`` and ``dtype`` keywords: the parameters are created
    on ``device`` (``"meta"`` allocates nothing), then cast to ``dtype``."""
    @functools.wraps(init)
    def placed_init(self, *args, device=None, dtype=None, **kwargs):
        with torch.device(device) if device is not None else contextlib.nullcontext():
            init(self, *args, **kwargs)
        if dtype is not None:
            self.to(dtype)

    signature = inspect.signature(init)
    placed_init.__signature__ = signature.replace(parameters=[
        *signature.parameters.values(),
        *(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None) for name in ("device", "dtype"))])
    return placed_init


class VisionTransformer(nn.Module):
    """ViT with timm's constructor, methods and parameter names, plus the paper's position-embedding ablations.

    pos_embed: 'learn' (1D learned table, the paper's default), 'learn_2d' (row and column tables of D/2 each,
    concatenated per patch), 'none', 'rel' (learned relative-position attention bias per head).
    pos_embed_at: 'stem' (added once to z_0), 'every_layer' (a separate table added before each block),
    'every_layer_shared' (one table added before every block). backend: 'auto' | 'torch' | 'triton'.
    residual_dtype: the dtype of the residual stream z under autocast: None / 'model' (default) for the dtype of the
    model's parameters, as in timm (fp32 for an fp32 model: the sums, LayerNorm inputs and what backward keeps of
    them stay fp32; bf16 in a model cast with ``.bfloat16()``), float32, bfloat16 / float16, or 'autocast' for the
    autocast dtype (16-bit saves 4 D bytes per token per block and rounds every residual add).
    timm's options beyond the paper: dynamic_img_pad (zero-pad images to whole patches), pre_norm (a LayerNorm on
    z_0 before the blocks, ``norm_pre``, CLIP's layout), qk_norm (LayerNorms of q and k per head),
    scale_attn_norm / scale_mlp_norm (a LayerNorm before the attention's projection / before fc2),
    final_norm=False (no final norm);
    where off, the norms are nn.Identity placeholders that run when replaced, as in timm. reg_tokens: learned
    register tokens after the class token (DINOv2 with registers). norm_layer / act_layer / embed_norm_layer: timm's
    names or factories (:func:`norm_layer_of`, :func:`act_layer_of`). global_pool='map': attention pooling by a
    learned latent query (SigLIP; ``attn_pool``). mlp_layer: a gated MLP ('swiglu', 'swiglu_packed', 'glu':
    ``fastvit.glu_mlp``) or a factory with timm's keywords. proj_bias=False: no bias in the attention's projection
    and the MLP. pool_include_prefix: pooling also reads the class and register tokens. weight_init / fix_init:
    timm's init modes (:meth:`init_weights`). patch_drop_rate: in training, drop that share of the patch tokens
    after the stem (``fastvit.patch_dropout``). block_fn: the block, the paper's pre-LN :class:`Block` by default,
    or timm's residual post-norm :class:`ResPostBlock` (:func:`block_fn_of`; also timm's parallel blocks,
    ``fastvit.parallel_blocks``). attn_layer: the blocks' attention (:func:`block_attention`; 'diff':
    ``fastvit.diff_attention``)."""

    @placed
    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, init_values=None,
                 class_token=True, pos_embed="learn", no_embed_class=False, fc_norm=None, dynamic_img_size=False,
                 drop_rate=0.0, pos_drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                 embed_layer=PatchEmbed, pos_embed_at="stem", backend="auto", residual_dtype=None,
                 pre_norm=False, dynamic_img_pad=False, qk_norm=False, scale_attn_norm=False, scale_mlp_norm=False,
                 final_norm=True, reg_tokens=0, norm_layer=None, act_layer=None, embed_norm_layer=None,
                 mlp_layer=None, proj_bias=True, pool_include_prefix=False, weight_init="", fix_init=False,
                 patch_drop_rate=0.0, block_fn=None, attn_layer=None):
        super().__init__()
        pos_embed = "none" if pos_embed == "" else pos_embed
        norm_layer, act_layer = norm_layer_of(norm_layer), act_layer_of(act_layer)
        _check_choice("global_pool", global_pool, GLOBAL_POOLS)
        _check_choice("pos_embed", pos_embed, POS_EMBEDS)
        _check_choice("pos_embed_at", pos_embed_at, POS_EMBED_AT)
        ops.check_backend(backend)
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg'")
        if pos_embed_at != "stem" and pos_embed not in ("learn", "learn_2d"):
            raise ValueError(f"pos_embed_at={pos_embed_at!r} needs pos_embed 'learn' or 'learn_2d', got {pos_embed!r}")
        if pos_embed == "learn_2d" and embed_dim % 2:
            raise ValueError(f"pos_embed='learn_2d' needs an even embed_dim, got {embed_dim}")
        if patch_drop_rate and (pos_embed == "rel" or pos_embed_at != "stem"):
            raise ValueError(f"patch_drop_rate needs the position table at the stem (pos_embed_at='stem', not 'rel': "
                             f"they need every patch); got pos_embed={pos_embed!r}, pos_embed_at={pos_embed_at!r}")
        if reg_tokens < 0 or (reg_tokens and pos_embed == "rel"):
            raise ValueError(f"reg_tokens must be 0 or more, and 0 with pos_embed='rel'; got {reg_tokens} with "
                             f"pos_embed={pos_embed!r}")
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.has_class_token = class_token
        self.num_prefix_tokens = (1 if class_token else 0) + reg_tokens
        self.num_reg_tokens = reg_tokens
        self.pool_include_prefix = pool_include_prefix
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.pos_embed_type = pos_embed
        self.pos_embed_at = pos_embed_at
        self.grad_checkpointing = False
        self.class_token_inference = False  # set_class_token_inference
        self.backend = backend
        residual_dtype = RESIDUAL_DTYPES.get(residual_dtype, residual_dtype)
        if residual_dtype not in RESIDUAL_DTYPES.values():
            raise ValueError(f"residual_dtype must be one of {tuple(RESIDUAL_DTYPES)} (or those torch dtypes), "
                             f"got {residual_dtype!r}")
        self.residual_dtype = residual_dtype

        # timm's keywords, so that its embed layers (PatchEmbed, HybridEmbed) build here too
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim, bias=not pre_norm, dynamic_img_pad=dynamic_img_pad,
                                       **({"strict_img_size": False, "output_fmt": "NHWC"} if dynamic_img_size else {}),
                                       **({"norm_layer": norm_layer_of(embed_norm_layer)} if embed_norm_layer else {}))
        self._embed_layer = type(self.patch_embed)  # a patch_embed of another type was put there by the user
        self._keep_embed_geometry()
        grid = self.patch_embed.grid_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        tables = depth if pos_embed_at == "every_layer" else 1
        self.pos_embed = self.pos_embed_h = self.pos_embed_w = None
        if pos_embed == "learn":
            rows = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(torch.zeros(tables, rows, embed_dim))
        elif pos_embed == "learn_2d":
            self.pos_embed_h = nn.Parameter(torch.zeros(tables, grid[0], embed_dim // 2))
            self.pos_embed_w = nn.Parameter(torch.zeros(tables, grid[1], embed_dim // 2))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.patch_drop = PatchDropout(patch_drop_rate, self.num_prefix_tokens) if patch_drop_rate else nn.Identity()
        self.norm_pre = norm_layer(embed_dim) if pre_norm else nn.Identity()

        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # stochastic depth decay rule
        block_fn = block_fn_of(block_fn)
        # timm passes every block attn_layer and its index; a block class written for Block's arguments gets them
        # only where it takes them (attn_layer when one is asked for)
        takes = inspect.signature(block_fn).parameters
        extra = {"attn_layer": attn_layer} if attn_layer is not None else {}
        self.blocks = nn.Sequential(*[
            block_fn(embed_dim, num_heads, mlp_ratio, qkv_bias, proj_drop_rate, attn_drop_rate, dpr[i], init_values,
                  rel_pos_grid=grid if pos_embed == "rel" else None, class_token=class_token, qk_norm=qk_norm,
                  scale_attn_norm=scale_attn_norm, scale_mlp_norm=scale_mlp_norm, norm_layer=norm_layer,
                  act_layer=act_layer, mlp_layer=mlp_layer, proj_bias=proj_bias, **extra,
                  **({"depth": i} if "depth" in takes else {}))
            for i in range(depth)])
        stride = self._embed_geometry[1]
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=max(stride))
                             for i in range(depth)]
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.norm = norm_layer(embed_dim) if final_norm and not use_fc_norm else nn.Identity()
        self.attn_pool = None
        if global_pool == "map":
            self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_layer=norm_layer,
                                                 mlp_layer=partial(Mlp, act_layer=act_layer))
        self.fc_norm = norm_layer(embed_dim) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        _check_choice("weight_init", weight_init, WEIGHT_INITS + ("skip",))
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init  # timm's: 'skip' defers a reset
        self.fix_init = fix_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)  # the layers were just built: nothing to reset
        self.set_backend(backend)

    def load_pretrained(self, checkpoint_path, prefix=""):
        """The original JAX (big_vision) ``.npz`` weights, as timm's method of this name (``timm.models.
        load_checkpoint`` calls it for a .npz file): :func:`fastvit.load_checkpoint`, which finds the prefix of the
        parameter names ('', 'opt/target/', ...) by itself; a ``prefix`` given must be one of those."""
        from fastvit.convert import NPZ_PREFIXES, load_checkpoint
        if prefix and prefix not in NPZ_PREFIXES:
            raise ValueError(f"prefix must be one of {NPZ_PREFIXES}, got {prefix!r}")
        load_checkpoint(self, checkpoint_path)

    def init_weights(self, mode="", needs_reset=True):
        """Initialise every parameter by timm's rule ``mode`` (default: the constructor's ``weight_init``):

        - '' (timm's): truncated-normal(0.02) tables and Linear weights, zero biases, near-zero class token;
        - 'jax' (big_vision, the paper's code): Xavier-uniform Linears with zero biases, except N(0, 1e-6) MLP biases
          and a zero head; a LeCun-normal patch projection; 'jax_nlhb' starts the head's bias at -log K;
        - 'moco' (MoCo v3): Xavier-uniform Linears, q, k and v each as a Linear of its own;
        - 'reset': the tables and tokens as in '', every layer by its own ``reset_parameters`` (PyTorch's defaults;
          what ``weight_init='skip'`` leaves for a later call, as in timm).

        Then each layer's own rule (a gated MLP's open gate, the attention pool's latent, the hybrid's backbone) and,
        with ``fix_init``, timm's scaling of each block's output projections by 1 / sqrt(2 layer). ``needs_reset``:
        layers no rule covers (norms; the patch projection outside 'jax') are reset too, so re-initialising a
        trained model starts it afresh, as timm's does; the constructor passes False (they are new)."""
        mode = mode or self.weight_init_mode
        _check_choice("mode", mode, WEIGHT_INITS)
        first = self.blocks[0] if len(self.blocks) else None
        if self.fix_init and first is not None and not (hasattr(getattr(first, "attn", None), "proj")
                                                        and hasattr(getattr(first, "mlp", None), "fc2")):
            raise ValueError(f"fix_init scales each block's attn.proj and mlp.fc2, which {type(first).__name__} has "
                             f"not (timm's fix_init fails there too)")
        for table in (self.pos_embed, self.pos_embed_h, self.pos_embed_w):
            if table is not None:
                trunc_normal_(table, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        head_bias = -math.log(self.num_classes) if mode == "jax_nlhb" and self.num_classes > 0 else 0.0
        for name, m in _children_first(self):  # timm's order, so that a seed draws timm's numbers
            if mode == "reset":
                if needs_reset and hasattr(m, "reset_parameters"):
                    m.reset_parameters()
            elif isinstance(m, nn.Linear):
                _init_linear(m, name, mode, head_bias)
            elif isinstance(m, nn.Conv2d) and mode.startswith("jax"):
                lecun_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif hasattr(m, "init_weights"):
                m.init_weights()
            elif needs_reset and hasattr(m, "reset_parameters"):
                m.reset_parameters()
        if self.fix_init:
            with torch.no_grad():
                for i, block in enumerate(self.blocks):
                    scale = math.sqrt(2.0 * (i + 1))
                    block.attn.proj.weight.div_(scale)
                    block.mlp.fc2.weight.div_(scale)

    # ---- configuration -------------------------------------------------------------------------------------
    def set_backend(self, name):
        """Choose the kernels for every op: 'auto' (Triton where it can run), 'torch' or 'triton'."""
        ops.check_backend(name)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = name

    def set_grad_checkpointing(self, enable=True):
        """Recompute each block in backward instead of keeping its activations."""
        self.grad_checkpointing = enable

    def set_class_token_inference(self, enable=True):
        """Let :meth:`forward` run the last block on the class token's row alone outside training steps too, as a
        training step always does where it may (:func:`class_token_suffices`; a head that reads the class token
        alone): 1/depth fewer of the encoder's projection and MLP products, about 6% less time for a B/16
        forward. The logits then agree with the whole computation to the rounding of the smaller products, not
        bit for bit, so it is off by default: timm's test suite asks an eval forward for the bits of its
        fx-traced graph, which runs every row. ``forward_features`` and the other stages always run every row."""
        self.class_token_inference = enable

    def group_matcher(self, coarse=False):
        """timm's parameter groups (stem, one per block, final norm last), read by layer-wise lr decay."""
        return dict(stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def no_weight_decay(self):
        """Names of parameters that weight decay should skip: position tables and the class token."""
        names = {"cls_token", "reg_token", "pos_embed", "pos_embed_h", "pos_embed_w"}
        names |= {f"blocks.{i}.attn.rel_pos_table" for i, _ in self._rel_pos_attentions()}
        return {n for n, _ in self.named_parameters() if n in names}

    def _rel_pos_attentions(self):
        """(block index, its attention) of the blocks whose attention has a relative-position table (a parallel
        block has no ``attn``, and no table)."""
        attns = ((i, getattr(b, "attn", None)) for i, b in enumerate(self.blocks))
        return [(i, a) for i, a in attns if getattr(a, "rel_pos_table", None) is not None]

    def get_classifier(self):
        return self.head

    def reset_classifier(self, num_classes, global_pool=None):
        """Replace the head by a zero-initialised D x K layer, as the paper does for fine-tuning."""
        if global_pool is not None:
            _check_choice("global_pool", global_pool, GLOBAL_POOLS)
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            if global_pool == "map" and self.attn_pool is None:
                raise ValueError("global_pool='map' needs the attention pool built with the model "
                                 "(global_pool='map' at construction)")
            if global_pool != "map":
                self.attn_pool = None
            self.global_pool = global_pool
            # the norm placement follows global_pool at construction: the kept one, for save_pretrained (timm's)
            self._model_args = {**getattr(self, "_model_args", {}), "fc_norm": not isinstance(self.fc_norm,
                                                                                             nn.Identity)}
        self.num_classes = num_classes
        if num_classes > 0:
            ref = next(self.parameters())  # the model's device and dtype (a patch embedding may have no proj)
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        self.head.train(self.training)

    def set_input_size(self, img_size=None, patch_size=None):
        """Adapt to a new image and/or patch size, interpolating the position tables in 2D (paper, fine-tuning); a
        frozen table (requires_grad False) stays frozen."""
        old_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        grid = self.patch_embed.grid_size
        if self.pos_embed is not None:
            num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            table = resample_abs_pos_embed(self.pos_embed.detach(), grid, old_grid, num_prefix)
            self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        if self.pos_embed_h is not None:
            self.pos_embed_h = nn.Parameter(resample_pos_embed_1d(self.pos_embed_h.detach(), grid[0]),
                                            requires_grad=self.pos_embed_h.requires_grad)
            self.pos_embed_w = nn.Parameter(resample_pos_embed_1d(self.pos_embed_w.detach(), grid[1]),
                                            requires_grad=self.pos_embed_w.requires_grad)
        for _, attn in self._rel_pos_attentions():
            attn.set_rel_pos_grid(grid)
        self._keep_embed_geometry()
        # the new size where timm's tools (get_model_input_config, save_for_hf) and save_pretrained read it
        size = tuple(self.patch_embed.img_size)
        self._traits = {**getattr(self, "_traits", {}), "img_size": size}
        self._model_args = {**getattr(self, "_model_args", {}), "img_size": size,
                            **({"patch_size": patch_size} if patch_size is not None else {})}

    def _keep_embed_geometry(self):
        """Record the patch grid and stride, for a patch_embed the user replaces by a module without them."""
        pe = self.patch_embed
        self._embed_geometry = (pe.grid_size, getattr(pe, "token_stride", pe.patch_size))

    def _patch_geometry(self):
        """(grid_size, stride) of the patch embedding: its own, or those recorded before it was replaced."""
        pe, (grid, stride) = self.patch_embed, self._embed_geometry
        return getattr(pe, "grid_size", grid), getattr(pe, "token_stride", getattr(pe, "patch_size", stride))

    # ---- forward -------------------------------------------------------------------------------------------
    def position_table(self, grid_size, layer=0):
        """E_pos for a patch grid, shape (1, L, D), resampled on the fly when the grid differs (dynamic size)."""
        base = self._patch_geometry()[0]
        if self.pos_embed is not None:
            table = self.pos_embed[layer:layer + 1]
            num_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
            return resample_abs_pos_embed(table, grid_size, base, num_prefix)
        if self.pos_embed_h is not None:
            rows = resample_pos_embed_1d(self.pos_embed_h[layer:layer + 1], grid_size[0])[0]
            cols = resample_pos_embed_1d(self.pos_embed_w[layer:layer + 1], grid_size[1])[0]
            gh, gw = grid_size
            table = torch.cat([rows[:, None].expand(gh, gw, -1), cols[None].expand(gh, gw, -1)], dim=-1)
            return table.reshape(1, gh * gw, -1)
        return None

    @property
    def _pos_covers_prefix(self):
        """Whether E_pos has rows for the prefix (class, register) tokens; learn_2d tables only cover patches."""
        return self.pos_embed is not None and not self.no_embed_class and self.num_prefix_tokens > 0

    def forward_features(self, x, attn_mask=None, is_causal=False):
        """Image batch -> (B, [1 +] N, D) tokens after the final LayerNorm; ``attn_mask`` / ``is_causal`` reach
        every block's attention, as in timm."""
        h, residual, _, _ = self._encode(x, attn_mask=attn_mask, is_causal=is_causal)
        return layer_norm(self.norm, h, residual, self.backend)[0]

    def forward_intermediates(self, x, indices=None, return_prefix_tokens=False, norm=False, stop_early=False,
                              output_fmt="NCHW", intermediates_only=False, output_dict=False, attn_mask=None,
                              is_causal=False):
        """The outputs z_i of the blocks ``indices`` (an int n: the last n; a list: those, negative from the end;
        None: all) next to the final features, with timm's arguments and results.

        Each z_i is (B, D, gh, gw) for ``output_fmt='NCHW'`` or (B, N, D) for 'NLC', without prefix tokens (they
        come paired with it under ``return_prefix_tokens``); ``norm`` passes each through the final norm;
        ``stop_early`` runs no block after the last one asked for (the final features then come from there).
        """
        _check_choice("output_fmt", output_fmt, ("NCHW", "NLC"))
        take, last = feature_take_indices(len(self.blocks), indices)
        h, residual, grid, taken = self._encode(x, take, last if stop_early else None, attn_mask, is_causal)
        if norm:
            taken = [layer_norm(self.norm, z, None, self.backend)[0] for z in taken]
        prefix = [z[:, :self.num_prefix_tokens] for z in taken] if self.num_prefix_tokens else None
        taken = [z[:, self.num_prefix_tokens:] for z in taken]
        if output_fmt == "NCHW":
            taken = [z.reshape(z.shape[0], grid[0], grid[1], -1).permute(0, 3, 1, 2).contiguous() for z in taken]
        if output_dict:
            out = {"image_intermediates": taken}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = layer_norm(self.norm, h, residual, self.backend)[0]
            return out
        if return_prefix_tokens and prefix is not None:
            taken = list(zip(taken, prefix))
        if intermediates_only:
            return taken
        return layer_norm(self.norm, h, residual, self.backend)[0], taken

    def get_intermediate_layers(self, x, n=1, reshape=False, return_prefix_tokens=False, norm=False, attn_mask=None):
        """The last ``n`` block outputs (or the blocks listed in ``n``): DINO's interface, as timm keeps it."""
        return self.forward_intermediates(x, n, return_prefix_tokens=return_prefix_tokens, norm=norm,
                                          output_fmt="NCHW" if reshape else "NLC", intermediates_only=True,
                                          attn_mask=attn_mask)

    def prune_intermediate_layers(self, indices=1, prune_norm=False, prune_head=True):
        """Drop the blocks after the last of ``indices`` (and the final norm / head if asked); returns the
        absolute indices kept, as timm's does."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    def _encode(self, x, take=(), last=None, attn_mask=None, is_causal=False, class_token=False):
        """Embedding and blocks up to ``last`` (all if None): (h, residual, grid, [z_i for i in take]), the
        tokens z = h + residual left as a sum for the final LayerNorm to fuse. ``class_token``: the caller reads
        the class token's row alone, so the last block may compute just that row (:func:`class_token_suffices`)."""
        masks = mask_keywords(attn_mask, is_causal)
        h, grid = self._embed(x)
        param = next(self.parameters(), None)
        h = call(self.patch_drop, residual_stream(h, self.residual_dtype, param))
        if not passes_through(self.norm_pre):
            h = residual_stream(self.norm_pre(h), self.residual_dtype, param)
        if not take and last is None and not masks and self.pos_embed_at == "stem" and \
                not runs_unmodified(self.blocks, nn.Sequential):
            # a hooked or replaced container runs whole, as in timm (the tables of the other layouts go between;
            # with a mask timm too calls the blocks one by one)
            return self._checkpointed(self.blocks, h), None, grid, []
        residual = None
        taken = []
        blocks = self.blocks if last is None else self.blocks[:last + 1]
        # the last block on the class token alone: nothing else of it is read (no taken outputs, no mask)
        class_token = class_token and not take and last is None and not masks
        for i, block in enumerate(blocks):
            if self.pos_embed_at != "stem":
                pos = self.position_table(grid, i if self.pos_embed_at == "every_layer" else 0)
                if not self._pos_covers_prefix:
                    pos = F.pad(pos, (0, 0, self.num_prefix_tokens, 0))
                h = h + pos.to(h.dtype)
            # otherwise the block is called as a module (its hooks fire) on the evaluated sum
            if class_token and i == len(blocks) - 1 and class_token_suffices(block):
                h, residual = self._checkpointed(block.forward_pair, h, residual, grid, class_token_only=True)
            elif output_may_fuse(block, Block):
                h, residual = self._checkpointed(block.forward_pair, h, residual, grid, attn_mask, is_causal)
            else:
                z = h if residual is None else h + residual
                h, residual = self._checkpointed(block, z, **grid_keyword(getattr(block, "attn", None), grid),
                                                 **masks), None
            if i in take:
                h, residual = (h if residual is None else h + residual), None
                taken.append(h)
        return h, residual, grid, taken

    def _embed(self, x):
        """(z_0 after ``pos_drop``, patch grid): the class token, the register tokens and the stem's position table
        with the patch tokens. A ``_pos_embed`` overridden by a subclass or on the instance builds z_0 from the
        patch tokens, as timm's forward calls it."""
        pe = self.patch_embed
        check = getattr(pe, "check_input", None)
        if check is not None:
            x, grid = check(x)
        own_stem = type(self)._pos_embed is VisionTransformer._pos_embed and "_pos_embed" not in self.__dict__
        # fused where it runs as built; a layer without our protocol (timm's own, a wrapper) returns patch tokens
        if check is None or not (own_stem and output_may_fuse(pe, self._embed_layer)):
            tokens = pe(x)  # hooked or replaced: it returns the patch tokens only, as timm's does
            if check is None:  # a replacement (timm's PatchEmbed, a wrapper): the grid from what it gave
                tokens, grid = self._replaced_embed_grid(x, tokens)
            else:  # (B, N, D) from the layout its options ask for; (B, gh, gw, D) from a layer without them
                rows = getattr(pe, "token_rows", None)
                tokens = rows(tokens) if rows is not None else tokens.flatten(1, 2) if tokens.ndim == 4 else tokens
            if not own_stem:  # (B, gh, gw, D) under dynamic_img_size, as timm's patch embedding gives them
                return self._pos_embed(tokens.unflatten(1, grid) if self.dynamic_img_size else tokens), grid
            return call(self.pos_drop, self._add_stem(tokens, grid)), grid
        table, cls_token, prefix_uncovered, prefix = self._stem_rows(grid)
        z = pe.embed(x, table, cls_token, prefix_uncovered)
        return call(self.pos_drop, z if prefix is None else self._prepend(prefix, z)), grid

    def _add_stem(self, tokens, grid):
        """z_0 from (B, N, D) patch tokens, in torch: the class and register tokens and the stem's table."""
        table, cls_token, prefix_uncovered, prefix = self._stem_rows(grid)
        z = ops.add_class_and_position(tokens, table, cls_token, prefix_uncovered)
        return z if prefix is None else self._prepend(prefix, z)

    def _pos_embed(self, x):
        """timm's stage for code that runs the stages by hand: patch tokens, (B, N, D) or (B, gh, gw, D), -> z_0
        with the class and register tokens and the stem's position table, after ``pos_drop``."""
        if x.ndim == 4:
            grid, x = tuple(x.shape[1:3]), x.flatten(1, 2)
        else:
            grid = self._patch_geometry()[0]
            if x.ndim != 3 or x.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"_pos_embed takes (B, {grid[0] * grid[1]}, D) tokens of the {grid[0]} x {grid[1]} "
                                 f"patch grid, or (B, gh, gw, D) for another grid; got {tuple(x.shape)}")
        return call(self.pos_drop, self._add_stem(x, grid))

    def _stem_rows(self, grid):
        """(position table, class token, whether the table lacks the class row, prefix rows) for the embedding op.
        The op writes one class row at most: with register tokens it embeds the patches alone, and the prefix rows
        [x_class; x_reg] (plus their position rows, if the table has them) join after, in torch."""
        table, prefix_uncovered = self._stem_table(grid), not self._pos_covers_prefix
        if self.reg_token is None:
            return table, self.cls_token, prefix_uncovered, None
        prefix = self.reg_token if self.cls_token is None else torch.cat([self.cls_token, self.reg_token], dim=1)
        if table is not None and not prefix_uncovered:
            n = self.num_prefix_tokens
            table, prefix = table[:, n:], prefix + table[:, :n]
        return table, None, True, prefix

    @staticmethod
    def _prepend(prefix, tokens):
        return torch.cat([prefix.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1)

    def _stem_table(self, grid):
        return self.position_table(grid) if self.pos_embed_at == "stem" else None

    def _replaced_embed_grid(self, x, tokens):
        """(B, N, D) tokens and their patch grid from a replaced patch embedding's output: NHWC as timm's gives
        it for dynamic sizes, else N tokens on the grid it (or the original) has, or the image's under
        dynamic_img_size."""
        if tokens.ndim == 4:
            return tokens.flatten(1, 2), tuple(tokens.shape[1:3])
        grid, stride = self._patch_geometry()
        if self.dynamic_img_size:
            stride = _pair(stride)
            grid = (x.shape[-2] // stride[0], x.shape[-1] // stride[1])
        if tokens.ndim != 3 or tokens.shape[1] != grid[0] * grid[1]:
            raise ValueError(f"the replaced patch_embed gave {tuple(tokens.shape)}; expected (B, {grid[0] * grid[1]}, "
                             f"D) tokens of a {grid[0]} x {grid[1]} patch grid (or (B, H, W, D))")
        return tokens, tuple(grid)

    def _checkpointed(self, fn, *args, **kwargs):
        """fn(*args, **kwargs), recomputed in backward instead of keeping its activations when grad checkpointing
        is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def pool(self, x, pool_type=None):
        """(B, L, D) tokens -> (B, D): the class token, or the mean / max / (mean + max) / 2 of the patch tokens
        (``pool_type``, default ``global_pool``; '' keeps every token), or the attention pool's output over the patch
        tokens where the model has one (global_pool='map')."""
        if self.attn_pool is not None:  # as timm: the attention pool reads the patch tokens, whatever pool_type
            return self.attn_pool(x if self.pool_include_prefix else x[:, self.num_prefix_tokens:])
        pool_type = self.global_pool if pool_type is None else pool_type
        if not pool_type:
            return x
        if pool_type == "token":
            return x[:, 0]
        _check_choice("global_pool", pool_type, ("avg", "avgmax", "max"))
        if not self.pool_include_prefix:
            x = x[:, self.num_prefix_tokens:]
        if pool_type == "avg":
            return x.mean(dim=1)
        return x.amax(dim=1) if pool_type == "max" else 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x, pre_logits: bool = False):
        """Pool the tokens (class token or average), normalise if fc_norm, then the linear head."""
        return self._head(self.pool(x), pre_logits)

    def _head(self, pooled, pre_logits=False):
        x = layer_norm(self.fc_norm, pooled, None, self.backend)[0]
        x = call(self.head_drop, x)
        return x if pre_logits else linear(self.head, x)

    def forward(self, x, attn_mask=None, is_causal=False):
        """forward_head(forward_features(x)). Where the head reads the class token only, the final LayerNorm
        normalises that token alone instead of all L: a LayerNorm works token by token, so the logits are the same
        bits. In a training step (train mode, grad enabled) the last block also computes that token's row alone
        where it may (:func:`class_token_suffices`): the other rows of its output are never read, and the logits
        and gradients agree to the rounding of its smaller products. In eval mode it runs whole, unless
        :meth:`set_class_token_inference` says otherwise, so that the logits keep the bits of the fx-traced graph
        (timm's test_model_forward_fx asks for them); always under torch.jit.trace (whose check traces again
        without grad: the two graphs must agree). A hooked, edited or fx-traced model, or a subclass with its own
        stages, runs the two stages as written."""
        masks = mask_keywords(attn_mask, is_causal)
        if not self._class_token_only():
            return self.forward_head(self.forward_features(x, **masks))
        training_step = self.training and torch.is_grad_enabled()
        h, residual, _, _ = self._encode(x, attn_mask=attn_mask, is_causal=is_causal,
                                         class_token=(training_step or self.class_token_inference)
                                         and not torch.jit.is_tracing())
        z = layer_norm(self.norm, h[:, 0], None if residual is None else residual[:, 0], self.backend)[0]
        return self._head(z)

    def __prepare_scriptable__(self):
        """torch.jit.script asks this first: a clear refusal instead of TorchScript's compiler error."""
        raise RuntimeError("fastvit models do not support TorchScript scripting (torch.jit.script); use "
                           "torch.export.export, torch.compile or torch.jit.trace")

    def _class_token_only(self) -> bool:
        # each stage still this class's own method: not overridden by a subclass nor set on the instance (a patched
        # stage has no __func__, or another one); asked through the bound methods, which dynamo traces in every
        # torch version (torch 2.11's cannot read set operations on an instance's __dict__: a graph break)
        return (self.global_pool == "token" and fusable_layer_norm(self.norm) and not fx_tracing()
                and getattr(self.forward_features, "__func__", None) is VisionTransformer.forward_features
                and getattr(self.forward_head, "__func__", None) is VisionTransformer.forward_head
                and getattr(self.pool, "__func__", None) is VisionTransformer.pool)


keep_original_forward(QuickGELU, PatchEmbed, Attention, Mlp, DropPath, Block)


# ---- registry: timm's ViT names ----------------------------------------------------------------------------------
# Each architecture of timm's vision_transformer.py that this class builds, with timm's constructor arguments
# (``fastvit.registry.timm_archs``, written from timm by scripts/gen_pretrained_cfgs.py); image sizes, head sizes and
# the rest come from each name's pretrained config, as in timm.

def constructor_args(args):
    """VisionTransformer keyword arguments from an architecture's JSON arguments: a norm layer given as
    [name, eps] becomes that norm with that eps."""
    args = dict(args)
    for key in ("norm_layer", "embed_norm_layer"):
        if isinstance(args.get(key), list):
            name, eps = args[key]
            args[key] = partial(norm_layer_of(name), eps=eps)
    return args


for _name, _args in timm_archs().items():
    register_model(_name, partial(VisionTransformer, **constructor_args(_args)), module="vision_transformer")
