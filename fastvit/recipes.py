"""The recipes' optimisation pieces: weight-decay groups, the optimizer, and the warmup-then-decay schedule."""
from __future__ import annotations

import math

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


def param_groups(model, weight_decay: float) -> list:
    """Weight decay on weight matrices only: 1-D parameters (biases, LayerNorm) and no_weight_decay() are exempt."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(recipe: str, model, lr: float, weight_decay: float):
    """The recipe's optimizer: AdamW (0.9, 0.999) to pre-train, SGD momentum 0.9 to fine-tune (the paper's)."""
    if recipe == "pretrain":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999))
    return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=0.9)


def make_scheduler(optimizer, warmup: int, total: int, kind: str):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(warmup, total, kind))
