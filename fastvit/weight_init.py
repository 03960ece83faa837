"""Truncated-normal initialisers that spend the RNG as timm's do, so that a seeded build gives timm's weights.

torch's ``nn.init.trunc_normal_`` has sampled by rejection since 2.x (normal draws, redrawn outside the cut) where
timm's ``trunc_normal_`` and ``trunc_normal_tf_`` map one uniform draw per element through the normal's inverse CDF:
the same distribution, other numbers. With timm's sampler, ``torch.manual_seed(s)`` then ``create_model(name)`` gives
timm's tensors bit for bit.
"""
import math

import torch


def _norm_cdf(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _inverse_cdf_(tensor: torch.Tensor, mean: float, std: float, a: float, b: float) -> torch.Tensor:
    """N(mean, std) cut to [a, b]: u uniform on [2 cdf(a') - 1, 2 cdf(b') - 1] for the standardised bounds, then
    mean + std sqrt(2) erfinv(u), clamped against rounding (timm's order of operations, for the same bits). A meta
    tensor has no values to draw: skipped, as the ops would cost ~3 ms each through torch's meta decompositions."""
    if tensor.is_meta:
        return tensor
    with torch.no_grad():
        tensor.uniform_(2 * _norm_cdf((a - mean) / std) - 1, 2 * _norm_cdf((b - mean) / std) - 1)
        tensor.erfinv_()
        tensor.mul_(std * math.sqrt(2.0))
        tensor.add_(mean)
        tensor.clamp_(min=a, max=b)
    return tensor


def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """N(mean, std) truncated to the absolute bounds [a, b] (timm's ``trunc_normal_``: at std 0.02 the cut at +-2
    never bites)."""
    return _inverse_cdf_(tensor, mean, std, a, b)


def trunc_normal_tf_(tensor: torch.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0,
                     b: float = 2.0) -> torch.Tensor:
    """mean + std t, t a standard normal truncated to [a, b]: the cut in units of std, as TF / JAX put it (timm's
    ``trunc_normal_tf_``)."""
    _inverse_cdf_(tensor, 0.0, 1.0, a, b)
    with torch.no_grad():
        tensor.mul_(std).add_(mean)
    return tensor


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """N(0, 1 / fan_in) truncated at 2 std, its std corrected for the cut (JAX's lecun_normal, timm's)."""
    return trunc_normal_tf_(weight, std=math.sqrt(1.0 / weight[0].numel()) / 0.87962566103423978)
