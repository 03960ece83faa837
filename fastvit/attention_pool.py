"""Attention pooling with learned latent queries: the ``global_pool='map'`` head (SigLIP, big_vision's "MAP" head).

Instead of taking the class token or averaging the tokens, L learned latent vectors (usually L = 1) attend over the
N tokens of the last block, then go through a residual MLP:

    q    = q_norm(latent W_q + b_q)                        latent in R^{L x D}, split into H heads of D_h = D / H
    k, v = k_norm(x W_k + b_k), x W_v + b_v                x in R^{N x D}; W_k, W_v stacked as one ``kv`` Linear
    a    = softmax(q k^T / sqrt(D_h)) v                    per head, heads concatenated back to D
    z    = proj(a)
    out  = z + MLP(LN(z))                                  then pooled over the L latents: first one, mean, or none

Parameter names, shapes and init follow timm 1.0's ``timm.layers.attention_pool.AttentionPoolLatent``, so a timm
state_dict loads with ``strict=True``; only the ``embed_dim == in_features == out_features`` configuration that
ViTs use is supported (no ``pos_embed``, ``q_proj=False``, ``latent_dim`` or pre-logits mode).
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from fastvit import ops
from fastvit.weight_init import trunc_normal_tf_

POOL_TYPES = ("token", "avg", "")


class AttentionPoolLatent(nn.Module):
    """(B, N, D) tokens -> (B, D) (``pool_type`` 'token' / 'avg') or (B, L, D) (``pool_type=''``) by cross-attention
    from ``latent_len`` = L learned queries; see the module docstring for the equations.

    ``mlp_layer(in_features, hidden_features)`` builds the MLP after the attention (the model passes its own Mlp, so
    the head shares its activation and kernels); it must expose fc1 / fc2 for timm's state_dict keys to match.
    ``norm_layer(dim)`` builds the pre-MLP norm and, with ``qk_norm``, the per-head q / k norms (default LayerNorm with
    eps 1e-6, what timm's ViTs pass). ``fused_attn`` chooses F.scaled_dot_product_attention over the explicit math.
    """

    def __init__(self, in_features: int, num_heads: int = 8, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 qk_norm: bool = False, latent_len: int = 1, pool_type: str = "token",
                 norm_layer: Callable[[int], nn.Module] | None = None,
                 mlp_layer: Callable[[int, int], nn.Module] | None = None, drop: float = 0.0):
        super().__init__()
        if mlp_layer is None:
            raise ValueError("mlp_layer is required: expected a callable (in_features, hidden_features) -> nn.Module, "
                             "e.g. the model's Mlp class")
        if in_features % num_heads != 0:
            raise ValueError(f"in_features ({in_features}) must be divisible by num_heads ({num_heads}); expected a "
                             f"num_heads that divides {in_features}")
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type must be one of {POOL_TYPES}, got {pool_type!r}")
        if latent_len < 1:
            raise ValueError(f"latent_len must be >= 1, got {latent_len}")
        if norm_layer is None:
            norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.num_heads = num_heads
        self.head_dim = in_features // num_heads
        self.scale = self.head_dim ** -0.5
        self.latent_len = latent_len
        self.pool = pool_type
        self.fused_attn = ops.timm_fused_attn()

        # Submodules are created in timm's order, so under the same seed the default inits draw the same numbers.
        self.latent = nn.Parameter(torch.zeros(1, latent_len, in_features))
        self.q = nn.Linear(in_features, in_features, bias=qkv_bias)
        self.kv = nn.Linear(in_features, 2 * in_features, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(in_features, in_features)
        self.proj_drop = nn.Dropout(drop)
        self.norm = norm_layer(in_features)
        self.mlp = mlp_layer(in_features, int(in_features * mlp_ratio))

        self.init_weights()

    def init_weights(self):
        """timm's init: latent ~ truncated normal with std D^-1/2 (cut at 2 std), so each latent vector starts with
        a norm near 1 whatever D is. The Linears and norms keep torch's default init, as in timm (a ViT's own
        init_weights then re-inits the Linears)."""
        trunc_normal_tf_(self.latent, std=self.latent.shape[-1] ** -0.5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attn_mask``: optional, broadcastable to (B, H, L, N); float masks are added to the logits, boolean masks
        keep the True positions (F.scaled_dot_product_attention's convention, on both paths)."""
        B, N, C = x.shape
        L, H, D_h = self.latent_len, self.num_heads, self.head_dim
        # The latent is shared by the batch: expand (a view), then the query projection.
        q = self.q(self.latent.expand(B, -1, -1)).reshape(B, L, H, D_h).transpose(1, 2)  # (B, H, L, D_h)
        k, v = self.kv(x).reshape(B, N, 2, H, D_h).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, D_h) each
        q, k = self.q_norm(q), self.k_norm(k)

        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            logits = ops.masked_scores(logits, attn_mask)
            x = logits.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(B, L, C)
        x = self.proj_drop(self.proj(x))
        x = x + self.mlp(self.norm(x))

        if self.pool == "token":
            return x[:, 0]
        if self.pool == "avg":
            return x.mean(1)
        return x
