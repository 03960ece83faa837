"""Bias + GELU fused into the next GEMM (the MLP's fc2): GELU(h + b1) W2^T + b2.

The GEMM applies the bias and the GELU (exact, or an approximation: ``bias_gelu``'s ``approximate``) to each tile
of the pre-activation h as it loads it (``matmul.fused_matmul``'s ``"bias_gelu"`` prologue), so the (rows, 4D)
activation is neither written nor read back: bias_gelu + cuBLAS writes it once and reads it once. Only h is kept
for backward.

Backward is :class:`~fastvit.kernels.bias_gelu.BiasGeluLinearFn`'s, unchanged (it saves the same h, b1, W2):
it recomputes the activation with the bias_gelu kernel for dW2, runs dH and dW2 on cuBLAS and applies the GELU
derivative with the bias_gelu backward kernel.

Why not bias + GELU in fc1's epilogue instead: that design writes both the pre-activation (for backward) and the
activation (for fc2), 8 D values per token, where this one writes h alone, 4 D (the model's fc1 GEMM, cuBLAS or
ln_matmul, runs without its bias, which this GEMM adds with the GELU: the ``"bias_gelu"`` prologue, so that the
backward's GELU pass sums its gradient). The price is that every column
block of fc2 recomputes the GELU of its A tiles (D / BLOCK_N times per value, 6 at D = 768), which the measured
choice in ``fastvit.ops`` weighs against cuBLAS on each GPU.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from fastvit.kernels._launch import eager_op
from fastvit.kernels import bias_gelu as _bg
from fastvit.kernels.matmul import fused_matmul, gemm_weights, variant_specs


def gelu_matmul_ref(x, bias, weight, weight_bias, approximate="none"):
    """Torch reference: F.linear(GELU(x + bias), W, b)."""
    return F.linear(_bg.bias_gelu_ref(x, bias, approximate), weight, weight_bias)


@eager_op("gelu_matmul_fwd")
def gelu_matmul_fwd(x: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor,
                    weight_bias: Optional[torch.Tensor], use_triton: bool, approximate: str = "none",
                    tma: bool = False) -> torch.Tensor:
    """GELU(x + bias) weight^T + weight_bias on x of shape (..., C), in weight's dtype; ``tma``: the persistent TMA
    GEMM."""
    if not use_triton:
        h = _bg.bias_gelu_fwd(x, bias, False, approximate).to(weight.dtype)
        return F.linear(h, weight, None if weight_bias is None else weight_bias.to(weight.dtype))
    a = x.reshape(-1, x.shape[-1])  # the GEMM's (rows, C) operand
    if bias is None:
        out = fused_matmul(a, weight, weight.dtype, weight_bias, prologue="gelu", tma=tma, approximate=approximate)
    else:
        out = fused_matmul(a, weight, weight.dtype, weight_bias, prologue="bias_gelu",
                           prologue_bias=bias.contiguous(), tma=tma, approximate=approximate)
    return out.view(*x.shape[:-1], weight.shape[0])


@gelu_matmul_fwd.register_fake
def _(x, bias, weight, weight_bias, use_triton, approximate="none", tma=False):
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=weight.dtype)


class GeluMatmulFn(_bg.BiasGeluLinearFn):
    """BiasGeluLinearFn with the bias + GELU folded into the GEMM's loads (and ``tma``, the kernel choice, after its
    arguments); same saved tensors, same backward."""

    @staticmethod
    def forward(ctx, x, bias, lin_weight, lin_bias, use_triton, approximate, tma=False):
        ctx.use_triton, ctx.approximate = use_triton, approximate
        ctx.has_lin_bias = lin_bias is not None
        ctx.save_for_backward(x, bias, lin_weight)
        return gelu_matmul_fwd(x, bias, gemm_weights(x, lin_weight), lin_bias, use_triton, approximate, tma)


def gelu_matmul(x, bias, lin_weight, lin_bias, use_triton, approximate="none", tma=False):
    """``bias_gelu.bias_gelu_linear`` (same arguments and result) with the bias + GELU in the GEMM; ``tma``: the
    persistent TMA GEMM (sm_90), where it can run."""
    return _bg.bias_gelu_linear(x, bias, lin_weight, lin_bias, use_triton, approximate, function=GeluMatmulFn,
                                function_args=(tma,))


def aot_specs(shape, dtype):
    """fc2: mlp_dim -> dim with bias, on an A (the fc1 output, without its bias: the prologue adds it, fp32 as under
    AMP) of the activation dtype; the exact GELU, then each approximation."""
    act = f"*{dtype}"
    label = f"fc2 {shape.mlp_dim}->{shape.dim}"
    return [spec for approximate in _bg.APPROXIMATIONS for tma in (False, True)
            for spec in variant_specs("gelu_matmul", dtype, "bias_gelu", act, act, True, False, tma=tma,
                                      approximate=approximate,
                                      label=label + ("" if approximate == "none" else f" {approximate}"))]
