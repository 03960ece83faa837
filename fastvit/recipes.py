"""The recipes' optimisation pieces: weight-decay groups, the optimizer, and the warmup-then-decay schedule."""
from __future__ import annotations

import math
import re

import torch


class WarmupDecay:
    """LambdaLR factor: linear warmup to 1 over ``warmup`` steps, then linear or cosine decay to 0 at ``total``.

    A class (not a closure) so that LambdaLR.state_dict() stores it."""

    def __init__(self, warmup: int, total: int, kind: str = "linear"):
        self.warmup, self.total, self.kind = warmup, total, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 1.0 - progress if self.kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))


def layer_id(name: str, matcher: dict, num_layers: int) -> int:
    """A parameter's depth for layer-wise lr decay from ``model.group_matcher()``: 0 for the stem, i + 1 for block
    i, the last block's for a pattern with a fixed ordinal (the final norm: timm's MATCH_PREV_GROUP), and
    num_layers + 1 for the rest (the head)."""
    if re.match(matcher["stem"], name):
        return 0
    for pattern, fixed in matcher["blocks"]:
        found = re.match(pattern, name)
        if found:
            return num_layers if fixed is not None else int(found.group(1)) + 1
    return num_layers + 1


def param_groups(model, weight_decay: float, lr: float, layer_decay: float | None = None) -> list:
    """Weight decay on weight matrices only: 1-D parameters (biases, LayerNorm) and no_weight_decay() are exempt.

    With ``layer_decay`` each depth (``layer_id``) gets its own groups at lr x layer_decay^(deepest - depth), so the
    head trains at lr (a headless model: its last block) and the stem slowest (BEiT's rule, as timm's
    ``param_groups_layer_decay``, which counts only the depths the model's parameters have, frozen ones too)."""
    skip = model.no_weight_decay()
    num_layers = len(model.blocks)
    matcher = model.group_matcher() if layer_decay is not None else None
    depths = {name: num_layers + 1 if matcher is None else layer_id(name, matcher, num_layers)
              for name, _ in model.named_parameters()}
    deepest = max(depths.values(), default=0)
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        depth = depths[name]
        decays = not (p.ndim <= 1 or name in skip)
        scale = 1.0 if layer_decay is None else layer_decay ** (deepest - depth)
        group = groups.setdefault((depth, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                                    "lr": lr * scale, "lr_scale": scale})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (-k[0], not k[1]))]


def make_optimizer(recipe: str, model, lr: float, weight_decay: float, layer_decay: float | None = None,
                   fused: bool = False):
    """The recipe's optimizer: AdamW (0.9, 0.999) to pre-train, SGD momentum 0.9 to fine-tune (the paper's);
    ``fused``: torch's fused implementation (a few kernels per step instead of several per parameter)."""
    groups = param_groups(model, weight_decay, lr, layer_decay)
    if recipe == "pretrain":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, fused=fused or None)


def make_scheduler(optimizer, warmup: int, total: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup, total, kind))
