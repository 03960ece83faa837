"""Stochastic depth (drop path), as timm's ``timm.layers.drop`` has it."""
import torch.nn as nn


def drop_path_or_identity(drop_path):
    """A branch's stochastic depth, an nn.Identity when off (timm's module types, for code that walks them)."""
    return DropPath(drop_path) if drop_path > 0 else nn.Identity()


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for whole samples, scaling the kept ones by 1/keep (with
    ``scale_by_keep``), with timm's arguments and arithmetic (the mask is scaled, then multiplied in: the same bits;
    ``drop_prob=1`` drops every sample, with no division by zero)."""

    def __init__(self, drop_prob=0.0, scale_by_keep=True):
        super().__init__()
        self.drop_prob = drop_prob
        self.scale_by_keep = scale_by_keep

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        if keep > 0.0 and self.scale_by_keep:
            mask.div_(keep)
        return x * mask

    def extra_repr(self):
        return f"drop_prob={round(self.drop_prob, 3):0.3f}"
