"""timm's parallel ViT blocks, with its parameter names, on fastvit's attention and fused MLP ops.

- :class:`ParallelThingsBlock` ("Three things everyone should know about Vision Transformers", Touvron et al.
  2022): z' = z + sum_i MSA_i(LN_i(z)), then z_out = z' + sum_i MLP_i(LN'_i(z')), ``num_parallel`` branches each
  (timm's ``vit_*_18x2_224``).
- :class:`ParallelScalingBlock` (ViT-22B, Dehghani et al. 2023): the attention and the MLP read one norm of z and
  run side by side, z_out = z + MSA(LN(z)) + MLP(LN(z)), with q, k, v and the MLP's first layer as one projection
  (timm's ``vit_*_xp_224`` and ``vit_pwee_*``).

Both take :class:`fastvit.model.Block`'s arguments, so ``block_fn`` (a class, timm's class or its name) selects them.
Importing this module registers the names in ``fastvit.model.BLOCK_FNS`` (``import fastvit`` does).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn

from fastvit import ops
from fastvit.drop import drop_path_or_identity
from fastvit.model import (BLOCK_FNS, LayerScale, act_layer_of, attention_keywords, block_attention, mlp_layer_of,
                           norm_layer_of, _block_mlp)
from fastvit.surgery import call, linear, runs_unmodified, unedited, weight_and_bias


def _no_rel_pos(rel_pos_grid, name):
    if rel_pos_grid is not None:
        raise ValueError(f"pos_embed='rel' needs one attention per block: use Block or ResPostBlock, not {name}")


def check_heads(dim, num_heads, head_split):
    """embed_dim splits into ``num_heads`` heads, each into ``head_split`` equal parts (differential attention's
    halves of q and k): else a ValueError now, not a reshape error in the first forward."""
    if dim % (num_heads * head_split):
        halves = " into heads of an even width (differential attention halves each)" if head_split > 1 else ""
        raise ValueError(f"embed_dim {dim} must be divisible by num_heads {num_heads}{halves}")


def in_projection_layers(block, dim, num_heads, head_split, mlp_ratio, qkv_bias, qk_norm, norm_layer, attn_drop,
                         rel_pos_grid, scale_norms):
    """The layers a ViT-22B block (plain or differential: heads of ``head_dim / head_split``) builds first, in
    timm's order: the norm, the one input projection [MLP hidden | q | k | v] (the MLP's bias is part of it with
    ``qkv_bias``, else ``mlp_bias``), the norms of q and k, the attention dropout; returns the MLP's width."""
    name = type(block).__name__
    _no_rel_pos(rel_pos_grid, name)
    if scale_norms:
        raise ValueError(f"{name} has no scale_attn_norm / scale_mlp_norm (timm's neither)")
    check_heads(dim, num_heads, head_split)
    norm_layer = norm_layer_of(norm_layer)
    block.num_heads = num_heads
    block.head_dim = dim // num_heads // head_split
    block.scale = block.head_dim ** -0.5
    block.fused_attn = ops.timm_fused_attn()
    hidden = int(mlp_ratio * dim)
    block.in_norm = norm_layer(dim)
    block.in_proj = nn.Linear(dim, hidden + 3 * dim, bias=qkv_bias)
    block.in_split = [hidden] + [dim] * 3
    block.mlp_bias = None if qkv_bias else nn.Parameter(torch.zeros(hidden))
    block.q_norm = norm_layer(block.head_dim) if qk_norm else nn.Identity()
    block.k_norm = norm_layer(block.head_dim) if qk_norm else nn.Identity()
    block.attn_drop = nn.Dropout(attn_drop)
    return hidden


def mlp_hidden(block, x_mlp):
    """A ViT-22B block's MLP activation from its share of the input projection: + ``mlp_bias`` (where the
    projection has none), the activation, dropout."""
    if block.mlp_bias is not None:
        x_mlp = x_mlp + block.mlp_bias
    return block.mlp_drop(block.mlp_act(x_mlp))


class ParallelThingsBlock(nn.Module):
    """``num_parallel`` attention branches side by side, then as many MLP branches; each branch is timm's
    ``nn.Sequential`` of norm, attn (or mlp), ls and drop_path. Takes Block's arguments and ``num_parallel``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, rel_pos_grid=None, class_token=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, norm_layer=None, act_layer=None, mlp_layer=None,
                 proj_bias=True, attn_layer=None, depth=0, num_parallel=2):
        super().__init__()
        _no_rel_pos(rel_pos_grid, type(self).__name__)
        norm_layer, mlp_layer = norm_layer_of(norm_layer), mlp_layer_of(mlp_layer)
        self.num_parallel = num_parallel

        def tail():
            return [("ls", LayerScale(dim, init_values) if init_values else nn.Identity()),
                    ("drop_path", drop_path_or_identity(drop_path))]
        self.attns, self.ffns = nn.ModuleList(), nn.ModuleList()
        for _ in range(num_parallel):  # built in timm's order (attention, MLP, attention, ...), so a seed draws alike
            self.attns.append(nn.Sequential(OrderedDict([
                ("norm", norm_layer(dim)),
                ("attn", block_attention(attn_layer, dim, num_heads, qkv_bias, attn_drop, proj_drop, None,
                                         class_token, qk_norm, scale_attn_norm, norm_layer, proj_bias, depth)),
                *tail()])))
            self.ffns.append(nn.Sequential(OrderedDict([
                ("norm", norm_layer(dim)),
                ("mlp", _block_mlp(dim, mlp_ratio, proj_drop, scale_mlp_norm, norm_layer, act_layer, mlp_layer,
                                   proj_bias)), *tail()])))

    def forward(self, x, attn_mask=None, is_causal=False):
        if attn_mask is None and not is_causal:
            x = x + torch.stack([branch(x) for branch in self.attns]).sum(dim=0)
        else:  # a mask reaches the attention itself, so the branch runs module by module, as in timm
            outs = []
            for branch in self.attns:
                m = branch._modules
                h = m["attn"](m["norm"](x), **attention_keywords(m["attn"], None, attn_mask, is_causal))
                outs.append(m["drop_path"](m["ls"](h)))
            x = x + torch.stack(outs).sum(dim=0)
        return x + torch.stack([branch(x) for branch in self.ffns]).sum(dim=0)


class ParallelScalingBlock(nn.Module):
    """z_out = z + ls(MSA(y) + MLP(y)), y = LN(z) projected once by ``in_proj`` into [MLP hidden | q | k | v].

    The MLP's first bias is ``in_proj``'s with ``qkv_bias``, else ``mlp_bias``; ``fuse_out_proj`` projects the
    concatenated attention and MLP outputs with one ``out_proj`` instead of ``attn_out_proj`` + ``mlp_out_proj``.
    The attention runs :func:`fastvit.ops.attention`, and the GELU runs inside the MLP's output projection
    (recomputed in backward) where nothing must see it. Takes Block's arguments (``mlp_layer``, ``attn_layer`` and
    ``depth`` are not used, as in timm) and ``fuse_out_proj``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, rel_pos_grid=None, class_token=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, norm_layer=None, act_layer=None, mlp_layer=None,
                 proj_bias=True, attn_layer=None, depth=0, fuse_out_proj=False):
        super().__init__()
        self.backend = "auto"
        hidden = in_projection_layers(self, dim, num_heads, 1, mlp_ratio, qkv_bias, qk_norm, norm_layer, attn_drop,
                                      rel_pos_grid, scale_attn_norm or scale_mlp_norm)
        self.mlp_drop = nn.Dropout(proj_drop)
        self.mlp_act = act_layer_of(act_layer)()
        self.out_proj = nn.Linear(dim + hidden, dim, bias=proj_bias) if fuse_out_proj else None
        self.attn_out_proj = None if fuse_out_proj else nn.Linear(dim, dim, bias=proj_bias)
        self.mlp_out_proj = None if fuse_out_proj else nn.Linear(hidden, dim, bias=proj_bias)
        self.ls = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = drop_path_or_identity(drop_path)

    def reset_parameters(self):
        if self.mlp_bias is not None:
            nn.init.zeros_(self.mlp_bias)

    def forward(self, x, attn_mask=None, is_causal=False):
        B, N, C = x.shape
        m = self._modules
        x_mlp, q, k, v = torch.split(linear(m["in_proj"], m["in_norm"](x)), self.in_split, dim=-1)
        q = call(m["q_norm"], q.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = call(m["k_norm"], k.view(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        attn_drop = m["attn_drop"]
        if self.fused_attn and unedited(attn_drop, nn.Dropout):
            x_attn = ops.attention(q, k, v, dropout_p=attn_drop.p if self.training else 0.0, backend=self.backend,
                                   attn_mask=attn_mask, is_causal=is_causal)
        else:
            attn = ops.masked_scores((q * self.scale) @ k.transpose(-2, -1), attn_mask, is_causal)
            x_attn = attn_drop(attn.softmax(dim=-1)) @ v
        x_attn = x_attn.transpose(1, 2).reshape(B, N, C)
        if m.get("out_proj") is not None:
            y = linear(m["out_proj"], torch.cat((x_attn, mlp_hidden(self, x_mlp)), dim=-1))
        else:
            y = self._out_projections(x_attn, x_mlp)
        return x + call(m["drop_path"], call(m["ls"], y))

    @property
    def _gelu_in_out_proj(self):
        """The GELU's ``approximate`` where it may run inside ``mlp_out_proj``'s op: an unmodified nn.GELU, an
        inactive unmodified dropout, an unmodified Linear; else None."""
        m = self._modules
        act, drop = m["mlp_act"], m["mlp_drop"]
        if (not runs_unmodified(act, nn.GELU) or not runs_unmodified(drop, nn.Dropout)
                or (drop.training and drop.p > 0) or not runs_unmodified(m["mlp_out_proj"], nn.Linear)):
            return None
        return act.approximate

    def _out_projections(self, x_attn, x_mlp):
        """attn_out_proj(x_attn) + mlp_out_proj(the MLP's activation), the activation (where it runs alone) first,
        so that a global hook sees timm's order."""
        m = self._modules
        approximate = self._gelu_in_out_proj
        if approximate is None:
            hidden = mlp_hidden(self, x_mlp)
            return linear(m["attn_out_proj"], x_attn) + m["mlp_out_proj"](hidden)
        return linear(m["attn_out_proj"], x_attn) + ops.bias_gelu_linear(
            x_mlp, self.mlp_bias, *weight_and_bias(m["mlp_out_proj"]), self.backend, approximate)


BLOCK_FNS.update(ParallelThingsBlock=ParallelThingsBlock, ParallelScalingBlock=ParallelScalingBlock)
