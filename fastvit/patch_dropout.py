"""Patch dropout (timm's ``patch_drop_rate``): in training, each image keeps a random subset of its patch tokens and
the blocks run on fewer tokens (FLIP, Li et al. 2023: cheaper pre-training steps at similar accuracy; "PatchDropout",
Liu et al. 2022). The prefix tokens (class, registers) are always kept. In eval mode it passes the tokens through.
"""
import torch
import torch.nn as nn


class PatchDropout(nn.Module):
    """Keep max(1, int(N (1 - prob))) of the N patch tokens of each image, chosen uniformly at random (by the order
    of N normal draws, as timm draws them, so a seeded run keeps timm's tokens); ``ordered`` keeps them in image
    order."""

    def __init__(self, prob=0.5, num_prefix_tokens=1, ordered=False):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered

    def forward(self, x):
        if not self.training or self.prob == 0:
            return x
        n = self.num_prefix_tokens
        prefix, patches = x[:, :n], x[:, n:]
        batch, tokens = patches.shape[:2]
        keep = torch.randn(batch, tokens, device=x.device).argsort(dim=-1)[:, :max(1, int(tokens * (1 - self.prob)))]
        if self.ordered:
            keep = keep.sort(dim=-1).values
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, *x.shape[2:]))
        return torch.cat([prefix, patches], dim=1) if n else patches
