"""Gated MLPs of timm's ViT configs (AIMv2, DINOv2-giant): the hidden units are a product of two projections, one
passed through the activation (Dauphin et al. 2017; Shazeer 2020, "GLU Variants Improve Transformer").

    GLU(z) = (a(z W_g + b_g) * (z W_x + b_x)) W_2 + b_2        SwiGLU: a = SiLU

Two layouts with timm's parameter names, so timm state_dicts load: :class:`SwiGLU` keeps the gate and value
projections apart (``fc1_g``, ``fc1_x``); :class:`GluMlp` packs them into one ``fc1`` as its two halves, value first
and gate last (``gate_last``) or the other way round. Constructor keywords are timm's Block calling
convention (``in_features``, ``hidden_features``, ``act_layer``, ``norm_layer``, ``bias``, ``drop``). They run as
plain torch modules: no fused kernel covers a gated MLP.
"""
from __future__ import annotations

import torch.nn as nn


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class _Gated(nn.Module):
    """What both layouts share: the activation, dropout, optional norm of the hidden units, and fc2."""

    def _tail(self, hidden_features, out_features, act_layer, norm_layer, bias, drop):
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop[0])
        self.norm = norm_layer(hidden_features) if norm_layer is not None else nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias[1])
        self.drop2 = nn.Dropout(drop[1])

    def _project(self, h):
        return self.drop2(self.fc2(self.norm(self.drop1(h))))


class SwiGLU(_Gated):
    """Gate and value projections as two Linears, ``fc1_g`` and ``fc1_x`` (AIMv2)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.SiLU, norm_layer=None,
                 bias=True, drop=0.0):
        super().__init__()
        hidden_features, bias = hidden_features or in_features, _pair(bias)
        self.fc1_g = nn.Linear(in_features, hidden_features, bias=bias[0])
        self.fc1_x = nn.Linear(in_features, hidden_features, bias=bias[0])
        self._tail(hidden_features, out_features or in_features, act_layer, norm_layer, bias, _pair(drop))

    def init_weights(self):
        """timm's: the gate starts open and flat (weights ~ N(0, 1e-6), bias 1), so the block starts near linear."""
        if self.fc1_g.bias is not None:
            nn.init.ones_(self.fc1_g.bias)
        nn.init.normal_(self.fc1_g.weight, std=1e-6)

    def forward(self, x):
        return self._project(self.act(self.fc1_g(x)) * self.fc1_x(x))


class GluMlp(_Gated):
    """Gate and value packed in one ``fc1`` of width ``hidden_features`` (two halves; the gate is the last half when
    ``gate_last``), fc2 from ``hidden_features // 2`` (DINOv2-giant: SiLU, gate first)."""

    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.Sigmoid, norm_layer=None,
                 bias=True, drop=0.0, gate_last=True):
        super().__init__()
        hidden_features, bias = hidden_features or in_features, _pair(bias)
        if hidden_features % 2:
            raise ValueError(f"GluMlp splits fc1 into two halves: hidden_features must be even, got {hidden_features}")
        self.gate_last = gate_last
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias[0])
        self._tail(hidden_features // 2, out_features or in_features, act_layer, norm_layer, bias, _pair(drop))

    def init_weights(self):
        """timm's: the gate half of fc1 starts open and flat (weights ~ N(0, 1e-6), bias 1)."""
        half = self.fc1.weight.shape[0] // 2
        # timm initialises the second half whichever half gates, and so do we: the same weights for the same seed
        if self.fc1.bias is not None:
            nn.init.ones_(self.fc1.bias[half:])
        nn.init.normal_(self.fc1.weight[half:], std=1e-6)

    def forward(self, x):
        first, second = self.fc1(x).chunk(2, dim=-1)
        h = first * self.act(second) if self.gate_last else self.act(first) * second
        return self._project(h)

