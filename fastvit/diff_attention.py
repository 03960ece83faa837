"""Differential attention ("Differential Transformer", Ye et al. 2024) as timm builds it, with its parameter names.

Each head splits q and k in two halves of head_dim / 2 and takes the difference of the two softmax maps against
the full-width v: DiffAttn(X) = (softmax(Q_1 K_1^T / sqrt(d)) - lambda softmax(Q_2 K_2^T / sqrt(d))) V, then a
per-head RMSNorm and a (1 - lambda_init) scale; lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) +
lambda_init, with lambda_init = 0.8 - 0.6 exp(-0.3 depth) from the block's index. :class:`DiffAttention` is an
``attn_layer`` ('diff') of the pre-LN and post-norm blocks; :class:`DiffParallelScalingBlock` is ViT-22B's parallel
block on it (timm's dwee, dlittle and dpwee models).

The two maps run SDPA (q and k are half as wide as v, which fastvit's attention kernel does not take).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastvit import ops
from fastvit.drop import drop_path_or_identity
from fastvit.model import ATTN_LAYERS, BLOCK_FNS, LayerScale, act_layer_of, attention_layers, norm_layer_of
from fastvit.parallel_blocks import check_heads, in_projection_layers, mlp_hidden
from fastvit.surgery import call, linear

__all__ = ["DiffAttention", "DiffParallelScalingBlock"]


class _DifferentialHeads(nn.Module):
    """lambda's parameters, the sub-norm and the two-map attention of both modules. Each subclass builds its layers
    in timm's order and draws lambda last (``reset_parameters``), so a seed gives timm's weights."""

    def _init_lambda(self, depth, dual_lambda):
        rms = norm_layer_of("rmsnorm")
        self.dual_lambda = dual_lambda
        if dual_lambda:
            self.lambda_a = nn.Parameter(torch.zeros((), dtype=torch.float32))
            self.lambda_b = nn.Parameter(torch.zeros((), dtype=torch.float32))
            self.lambda_q1 = self.lambda_k1 = self.lambda_q2 = self.lambda_k2 = None
        else:
            self.lambda_a = self.lambda_b = None
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                setattr(self, name, nn.Parameter(torch.empty(self.head_dim, dtype=torch.float32)))
        self.sub_norm = rms(2 * self.head_dim, eps=1e-5)
        self.set_lambda_init(depth)

    def set_lambda_init(self, depth):
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * depth)

    def _reset_lambda(self):
        if self.dual_lambda:
            nn.init.zeros_(self.lambda_a)
            nn.init.zeros_(self.lambda_b)
        else:
            for p in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
                nn.init.normal_(p, mean=0, std=0.1)

    def _lambda(self):
        if self.dual_lambda:
            return torch.exp(self.lambda_a) - torch.exp(self.lambda_b) + self.lambda_init
        return (torch.exp(torch.sum(self.lambda_q1 * self.lambda_k1, dim=-1).float())
                - torch.exp(torch.sum(self.lambda_q2 * self.lambda_k2, dim=-1).float()) + self.lambda_init)

    def _attend(self, q, k, v, attn_mask, is_causal):
        """(B, N, D) q, k, v projections -> the heads' normalised, scaled difference, (B, N, D)."""
        B, N, C = v.shape
        q = q.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, N, 2 * self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, 2 * self.head_dim).transpose(1, 2)
        q, k = call(self._modules["q_norm"], q), call(self._modules["k_norm"], k)
        lambda_full = self._lambda().type_as(q)
        if self.fused_attn:
            q1, q2 = q.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
            k1, k2 = k.reshape(B, self.num_heads, 2, N, self.head_dim).unbind(2)
            p = self.attn_drop_p if self.training else 0.0  # timm's: attn_drop may be replaced (nn.Identity)
            out = (F.scaled_dot_product_attention(q1, k1, v, attn_mask=attn_mask, dropout_p=p, is_causal=is_causal)
                   - lambda_full * F.scaled_dot_product_attention(q2, k2, v, attn_mask=attn_mask, dropout_p=p,
                                                                  is_causal=is_causal))
        else:
            attn = ops.masked_scores((q * self.scale) @ k.transpose(-2, -1), attn_mask, is_causal)
            attn = self.attn_drop(attn.softmax(dim=-1)).view(B, self.num_heads, 2, N, N)
            out = (attn[:, :, 0] - lambda_full * attn[:, :, 1]) @ v
        out = self.sub_norm(out) * (1 - self.lambda_init)
        return out.transpose(1, 2).reshape(B, N, C)


class DiffAttention(_DifferentialHeads):
    """timm's ``DiffAttention``: ``attn_layer='diff'`` (norm_layer RMSNorm unless given; ``depth`` sets
    lambda_init; ``dual_lambda``: two scalars instead of the paper's four head_dim vectors)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, scale_norm=False, proj_bias=True,
                 attn_drop=0.0, proj_drop=0.0, norm_layer=None, depth=0, dual_lambda=False):
        super().__init__()
        check_heads(dim, num_heads, 2)
        norm_layer = norm_layer_of(norm_layer or "rmsnorm")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads // 2
        attention_layers(self, dim, qkv_bias, qk_norm, scale_norm, norm_layer, attn_drop, proj_drop, proj_bias)
        self.attn_drop_p = attn_drop
        self._init_lambda(depth, dual_lambda)
        self.reset_parameters()

    def reset_parameters(self):
        self._reset_lambda()

    def forward(self, x, attn_mask=None, is_causal=False):
        q, k, v = self.qkv(x).chunk(3, dim=2)
        out = call(self._modules["norm"], self._attend(q, k, v, attn_mask, is_causal))
        return call(self._modules["proj_drop"], linear(self._modules["proj"], out))


class DiffParallelScalingBlock(_DifferentialHeads):
    """timm's ``DiffParallelScalingBlock``: :class:`fastvit.parallel_blocks.ParallelScalingBlock` with differential
    attention and one output projection over [attention | MLP]. Takes Block's arguments, ``depth``, ``dual_lambda``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=True, proj_drop=0.0, attn_drop=0.0,
                 drop_path=0.0, init_values=None, rel_pos_grid=None, class_token=True, qk_norm=False,
                 scale_attn_norm=False, scale_mlp_norm=False, norm_layer=None, act_layer=None, mlp_layer=None,
                 proj_bias=True, attn_layer=None, depth=0, dual_lambda=False):
        super().__init__()
        hidden = in_projection_layers(self, dim, num_heads, 2, mlp_ratio, qkv_bias, qk_norm, norm_layer, attn_drop,
                                      rel_pos_grid, scale_attn_norm or scale_mlp_norm)
        self.attn_drop_p = attn_drop
        self._init_lambda(depth, dual_lambda)
        self.mlp_drop = nn.Dropout(proj_drop)
        self.mlp_act = act_layer_of(act_layer)()
        self.out_proj = nn.Linear(dim + hidden, dim, bias=proj_bias)
        self.ls = LayerScale(dim, init_values) if init_values is not None else nn.Identity()
        self.drop_path = drop_path_or_identity(drop_path)
        self.reset_parameters()

    def reset_parameters(self):
        if self.mlp_bias is not None:
            nn.init.zeros_(self.mlp_bias)
        self._reset_lambda()

    def forward(self, x, attn_mask=None, is_causal=False):
        m = self._modules
        x_mlp, q, k, v = torch.split(linear(m["in_proj"], m["in_norm"](x)), self.in_split, dim=-1)
        x_attn = self._attend(q, k, v, attn_mask, is_causal)
        y = linear(m["out_proj"], torch.cat((x_attn, mlp_hidden(self, x_mlp)), dim=-1))
        return x + call(m["drop_path"], call(m["ls"], y))


ATTN_LAYERS.update(diff=DiffAttention)
BLOCK_FNS.update(DiffParallelScalingBlock=DiffParallelScalingBlock)
