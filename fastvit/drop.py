"""Stochastic depth (drop path), as timm's ``timm.layers.drop`` has it."""
import torch.nn as nn


def drop_path_or_identity(drop_path):
    """A branch's stochastic depth, an nn.Identity when off (timm's module types, for code that walks them)."""
    return DropPath(drop_path) if drop_path > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, scaling the kept ones by 1/keep."""

    def __init__(self, drop_prob=0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep
